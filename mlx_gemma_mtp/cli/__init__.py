"""The command line: `generate`, `chat` and `serve` here; `convert`, `eval-quant` and `train-drafter` load their
own modules when run (see `main.LAZY_SUBCOMMANDS`)."""

from .main import main

__all__ = ["main"]
