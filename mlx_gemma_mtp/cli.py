"""Command line: `mlx-gemma-mtp SUBCOMMAND ...` (also `python -m mlx_gemma_mtp`)."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import sys

from .sampling import SamplerConfig

DEMO_PROMPT = 'import os\n\n\ndef walk_files(top):\n    """Yield the path of every file under top."""\n'


def _draft_tokens(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected an integer or 'auto'") from None


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": true}}', "
                                         f"got {value!r}")
    return parsed


def add_sampling_arguments(p) -> None:
    """Sampling and draft-length flags, shared by `generate` and `chat` (read back by `sampler_from`)."""
    p.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-draft-tokens", type=_draft_tokens, default=None,
                   help="draft length K, 0 for plain decoding, or 'auto' (default when a drafter is loaded)")


def sampler_from(args, bundle) -> SamplerConfig:
    """The flags' sampling settings; top-p/top-k from the checkpoint's generation_config unless given."""
    defaults = bundle.generation
    return SamplerConfig(
        temperature=args.temp,
        top_p=args.top_p if args.top_p is not None else (defaults.top_p or 1.0),
        top_k=args.top_k if args.top_k is not None else (defaults.top_k or 0),
        min_p=args.min_p,
        seed=args.seed,
    )


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a Gemma 4 checkpoint (MTP when a drafter is given)")
    p.add_argument("--model", default=None,
                   help="local folder or hub id of a Gemma 4 checkpoint or bundle (default: the offline demo pair)")
    p.add_argument("--draft", default=None, help="folder or hub id of the matching gemma4_assistant drafter")
    p.add_argument("--prompt", default=None, help="default: a question, or a code prefix for the demo pair")
    p.add_argument("--max-tokens", type=int, default=256)
    add_sampling_arguments(p)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text (BOS is added)")
    p.add_argument("--chat-template-kwargs", type=_json_object, default=None,
                   help='options for the chat template as JSON, e.g. \'{"enable_thinking": true}\'')
    p.add_argument("--thinking", action="store_true",
                   help="let Gemma 4 think first (enable_thinking); the thought is printed dimmed, or after a "
                        "'[thinking]' marker when stdout is not a terminal")
    p.set_defaults(func=run_generate)


def format_stats(r) -> str:
    lines = [
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens/s | generation: {r.generation_tokens} "
        f"tokens, {r.generation_tps:.1f} tokens/s | peak memory: {r.peak_memory:.3f} GB"
    ]
    if (d := r.draft) is not None:
        per_pos = " ".join(f"{a:.2f}" for a in d.acceptance_per_position) or "-"
        lines.append(
            f"MTP: {d.rounds} drafting rounds + {d.plain_rounds} plain steps, {d.accepted}/{d.drafted} drafts accepted "
            f"({d.acceptance_rate:.1%}), mean accepted length {d.mean_accepted_length:.2f} per drafting round, "
            f"acceptance per position [{per_pos}]"
        )
    return "\n".join(lines)


def run_generate(args) -> None:
    from . import load, stream_generate
    from .distributed import distributed_group

    group = distributed_group()  # under `mlx.launch`: the target split across the ranks, rank 0 prints
    out = sys.stdout if group is None or group.rank() == 0 else io.StringIO()  # the other ranks print nothing
    model, dtype = args.model, None
    if model is None:
        from .demo import demo_dtype, demo_path

        model, dtype = demo_path(), demo_dtype()
        args.prompt = DEMO_PROMPT if args.prompt is None else args.prompt
        print("Running the offline demo pair (a small Gemma 4-architecture model trained on Python's standard "
              "library, with its MTP drafter). For a real Gemma 4: --model google/gemma-4-E2B-it "
              "--draft google/gemma-4-E2B-it-assistant", file=sys.stderr if out is sys.stdout else out)
    if group is None:
        bundle = load(model, draft=args.draft, dtype=dtype)
    else:
        from .distributed_load import load_sharded

        bundle = load_sharded(model, args.draft, group, dtype)
    sampler = sampler_from(args, bundle)
    if args.prompt is None:
        args.prompt = "Write a haiku about speculative decoding."
    use_chat = not args.no_chat_template and bundle.tokenizer is not None and bundle.tokenizer.has_chat_template
    prompt = [{"role": "user", "content": args.prompt}] if use_chat else args.prompt
    template_kwargs = dict(args.chat_template_kwargs or {})
    if args.thinking:
        template_kwargs["enable_thinking"] = True
    printer = _ChannelPrinter(out)
    if args.model is None and not use_chat:  # the demo continues its prompt: show it first, dimmed on a terminal
        tty = out.isatty()
        out.write(f"{_ChannelPrinter.DIM}{args.prompt}{_ChannelPrinter.RESET}" if tty else args.prompt)
    last = None
    for last in stream_generate(bundle, prompt, args.max_tokens, sampler, args.num_draft_tokens,
                                chat_template_kwargs=template_kwargs or None):
        printer.write(last.channel, last.text)
    printer.end()
    print(format_stats(last), file=sys.stderr if out is sys.stdout else out)


class _ChannelPrinter:
    """Prints the answer as is and a thought dimmed (ANSI) on a terminal, or under a marker line otherwise."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out):
        self.out, self.tty, self.channel = out, out.isatty(), "answer"

    def write(self, channel: str, text: str) -> None:
        if not text:
            return
        if channel != self.channel:
            if self.tty:
                self.out.write(self.RESET if channel == "answer" else self.DIM)
            else:
                self.out.write(f"[{'answer' if channel == 'answer' else 'thinking'}]\n")
            self.channel = channel
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self.out.write((self.RESET if self.tty and self.channel != "answer" else "") + "\n")
        self.out.flush()


# Subcommands whose modules load only when used (`generate` never imports the converter or the trainer):
# name -> (module, its parser-registering function, the one-line help `mlx-gemma-mtp --help` shows).
LAZY_SUBCOMMANDS = {
    "convert": ("mlx_gemma_mtp.convert", "add_convert_parser",
                "convert a Hugging Face Gemma 4 checkpoint (+ drafter) to an MLX bundle"),
    "eval-quant": ("mlx_gemma_mtp.convert", "add_eval_quant_parser",
                   "KL / top-1 / MTP acceptance of a converted bundle vs its source"),
    "train-drafter": ("mlx_gemma_mtp.tuner.train_drafter", "add_train_drafter_parser",
                      "distil an MTP drafter (gemma4_assistant) for a Gemma 4 target"),
    "chat": ("mlx_gemma_mtp.chat", "add_chat_parser",
             "chat with a Gemma 4 checkpoint in the terminal (MTP, prompt cache)"),
    "serve": ("mlx_gemma_mtp.server", "add_serve_parser",
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
