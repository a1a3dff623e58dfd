"""Command line: `mlx-gemma-mtp SUBCOMMAND ...` (also `python -m mlx_gemma_mtp`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .generate import add_generate_parser

# Subcommands whose modules load only when used (`generate` never imports the converter or the trainer):
# name -> (module, its parser-registering function, the one-line help `mlx-gemma-mtp --help` shows).
LAZY_SUBCOMMANDS = {
    "convert": ("mlx_gemma_mtp.convert", "add_convert_parser",
                "convert a Hugging Face Gemma 4 checkpoint (+ drafter) to an MLX bundle"),
    "eval-quant": ("mlx_gemma_mtp.convert", "add_eval_quant_parser",
                   "KL / top-1 / MTP acceptance of a converted bundle vs its source"),
    "train-drafter": ("mlx_gemma_mtp.tuner.train_drafter", "add_train_drafter_parser",
                      "distil an MTP drafter (gemma4_assistant) for a Gemma 4 target"),
    "chat": ("mlx_gemma_mtp.cli.chat", "add_chat_parser",
             "chat with a Gemma 4 checkpoint in the terminal (MTP, prompt cache)"),
    "serve": ("mlx_gemma_mtp.cli.serve", "add_serve_parser",
              "an OpenAI-compatible HTTP server (chat/completions, completions, models)"),
}


def add_lazy_parser(sub, name: str, command: str | None) -> None:
    """The real parser of `name` when it is the `command` being run, else a placeholder that only lists it."""
    module, register, help_text = LAZY_SUBCOMMANDS[name]
    if name == command:
        getattr(importlib.import_module(module), register)(sub)
    else:
        sub.add_parser(name, help=help_text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top-level parser has no options
    parser = argparse.ArgumentParser(prog="mlx-gemma-mtp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    for name in LAZY_SUBCOMMANDS:
        add_lazy_parser(sub, name, command)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
