"""`mlx-gemma-mtp generate`: one answer to one prompt, streamed to the terminal, with MTP stats after it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from .options import add_model_arguments, add_sampling_arguments, json_object, load_model, sampler_from
from .output import ChannelPrinter, format_stats

DEMO_BANNER = ("Running the offline demo pair (a small Gemma 4-architecture model trained on Python's standard "
               "library, with its MTP drafter). For a real Gemma 4: --model google/gemma-4-E2B-it "
               "--draft google/gemma-4-E2B-it-assistant")
DEMO_PROMPT = 'import os\n\n\ndef walk_files(top):\n    """Yield the path of every file under top."""\n'


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a Gemma 4 checkpoint (MTP when a drafter is given)")
    add_model_arguments(p)
    p.add_argument("--prompt", default=None, help="default: a question, or a code prefix for the demo pair")
    p.add_argument("--max-tokens", type=int, default=256)
    add_sampling_arguments(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to ask about (repeatable; placed before the prompt's text, in the given order)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video to ask about (repeatable; up to 32 frames sampled; placed after the images; "
                        "decoding needs PyAV: pip install 'mlx-gemma-mtp[video]')")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="an audio clip to ask about (repeatable; E2B/E4B; placed after the images and videos)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text (BOS is added)")
    p.add_argument("--chat-template-kwargs", type=json_object, default=None,
                   help='options for the chat template as JSON, e.g. \'{"enable_thinking": true}\'')
    p.add_argument("--thinking", action="store_true",
                   help="let Gemma 4 think first (enable_thinking); the thought is printed dimmed, or after a "
                        "'[thinking]' marker when stdout is not a terminal")
    p.set_defaults(func=run_generate)


def media_parts(images: list[str], audio: list[str], videos: list[str] = ()) -> list[dict]:
    """Chat content parts for `--image` / `--video` / `--audio` files, in that order (checked to exist, so a typo
    fails before loading)."""
    for path in [*images, *videos, *audio]:
        if not Path(path).expanduser().is_file():
            raise SystemExit(f"error: {path}: no such file")
    files = [("image", p) for p in images] + [("video", p) for p in videos] + [("audio", p) for p in audio]
    return [{"type": kind, kind: str(Path(p).expanduser())} for kind, p in files]


def run_generate(args) -> None:
    from .. import stream_generate
    from ..distributed.group import distributed_group

    group = distributed_group()  # under `mlx.launch`: the target split across the ranks, rank 0 prints
    out = sys.stdout if group is None or group.rank() == 0 else io.StringIO()  # the other ranks print nothing
    if args.model is None:
        args.prompt = DEMO_PROMPT if args.prompt is None else args.prompt
        print(DEMO_BANNER, file=sys.stderr if out is sys.stdout else out)
    media = media_parts(args.image, args.audio, args.video)  # a missing file fails before the (slow) load
    if media and args.no_chat_template:
        raise SystemExit("error: --image/--video/--audio need the chat template (leave out --no-chat-template)")
    bundle = load_model(args, group)
    sampler = sampler_from(args, bundle)
    if args.prompt is None:
        args.prompt = "Write a haiku about speculative decoding."
    use_chat = not args.no_chat_template and bundle.tokenizer is not None and bundle.tokenizer.has_chat_template
    if media and not use_chat:
        raise SystemExit(f"error: --image/--video/--audio need a chat template, and {bundle.path.name} has none")
    content = [*media, {"type": "text", "text": args.prompt}] if media else args.prompt
    prompt = [{"role": "user", "content": content}] if use_chat else args.prompt
    template_kwargs = dict(args.chat_template_kwargs or {})
    if args.thinking:
        template_kwargs["enable_thinking"] = True
    printer = ChannelPrinter(out)
    if args.model is None and not use_chat:  # the demo continues its prompt: show it first, dimmed on a terminal
        tty = out.isatty()
        out.write(f"{ChannelPrinter.DIM}{args.prompt}{ChannelPrinter.RESET}" if tty else args.prompt)
    last = None
    for last in stream_generate(bundle, prompt, args.max_tokens, sampler, args.num_draft_tokens,
                                chat_template_kwargs=template_kwargs or None):
        printer.write(last.channel, last.text)
    printer.end()
    print(format_stats(last), file=sys.stderr if out is sys.stdout else out)
