"""Synthetic face rendering speed: 200 faces per round at 112x112, the training size.

The figure that matters is one CPU core's, so run it pinned:
    taskset -c 0 python -m pytest benchmarks/test_bench_synthetic.py --benchmark-only
`extra_info["images_per_s"]` is faces per second of the median round.
"""

from __future__ import annotations

import pytest

from lldif.data.synthetic import SyntheticFaceGenerator

FACES_PER_ROUND = 200


@pytest.mark.parametrize("size", [112], ids=lambda size: f"{size}px-pil")
def test_synthetic_faces(benchmark, size):
    generator = SyntheticFaceGenerator(seed=0, size=size)

    def render_faces() -> None:
        for index in range(FACES_PER_ROUND):
            generator.render(index)

    benchmark.group = f"synthetic faces {size}px"
    benchmark.pedantic(render_faces, rounds=5, warmup_rounds=1)
    benchmark.extra_info["faces_per_round"] = FACES_PER_ROUND
    benchmark.extra_info["images_per_s"] = round(FACES_PER_ROUND / benchmark.stats.stats.median, 1)
