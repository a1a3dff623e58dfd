"""The offline demo pair shipped with the package: a small Gemma 4-architecture target trained on the Python
standard library's source, with a distilled MTP drafter (built by `python -m mlx_gemma_mtp.demo.make`)."""

from __future__ import annotations

from pathlib import Path

PAIR_DIR = Path(__file__).parent / "pair"


def demo_path() -> Path:
    """The shipped demo bundle, or a FileNotFoundError saying how to build it."""
    if not (PAIR_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo pair is missing from {PAIR_DIR}; build it with `python -m mlx_gemma_mtp.demo.make` "
            "or pass --model with a Gemma 4 checkpoint"
        )
    return PAIR_DIR
