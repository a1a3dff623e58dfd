"""The offline demo pair shipped with the package: a small Gemma 4-architecture target trained on the Python
standard library's source, with a distilled MTP drafter (built by `python -m mlx_gemma_mtp.demo.make`)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

PAIR_DIR = Path(__file__).parent / "pair"


def demo_path() -> Path:
    """The shipped demo bundle, or a FileNotFoundError saying how to build it."""
    if not (PAIR_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo pair is missing from {PAIR_DIR}; build it with `python -m mlx_gemma_mtp.demo.make` "
            "or pass --model with a Gemma 4 checkpoint"
        )
    return PAIR_DIR


def demo_dtype() -> mx.Dtype | None:
    """The demo ships float16 weights; MLX's CPU backend has no fast half-precision matmul, so use float32 there."""
    return mx.float32 if mx.default_device().type == mx.cpu else None
