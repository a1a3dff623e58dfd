"""`mlx-gemma-mtp chat`: a terminal conversation with a Gemma 4 checkpoint (mlx_lm.chat's REPL) over one
`PromptCache`, so each turn prefills only what is new; MTP stats follow every answer on one dim line."""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field

from ..prompt_cache import PromptCache
from ..sampling import SamplerConfig
from .options import add_model_arguments, add_sampling_arguments, load_model, sampler_from
from .output import ChannelPrinter, format_stats

HELP = ("type a message; /image, /video or /audio PATH attaches a file to your next message, /reset starts over, "
        "/stats shows the last answer's stats, /exit, /quit or Ctrl-D ends, Ctrl-C stops an answer")
MEDIA_COMMANDS = {"/image": "image", "/video": "video", "/audio": "audio"}


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a Gemma 4 checkpoint in the terminal (MTP, prompt cache)")
    add_model_arguments(p)
    p.add_argument("--max-tokens", type=int, default=1024, help="per answer")
    add_sampling_arguments(p)
    p.add_argument("--thinking", action="store_true", help="let Gemma 4 think first (the thought is dimmed)")
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    p.set_defaults(func=_main)


def _main(args) -> None:
    run_chat(load_model(args), args)


@dataclass
class Chat:
    """One conversation: its messages, the K/V already prefilled, and the last answer's final response. With
    `raw` (a model without a chat template, e.g. the demo pair) the conversation is one text that each line you
    type extends and each answer continues."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    cache: PromptCache = field(default_factory=PromptCache)
    last: object = None  # the last GenerationResponse (for /stats)
    raw: bool = False
    attached: list[dict] = field(default_factory=list)  # media parts for the next message (/image, /video, /audio)

    def prompt(self):
        """What the model continues: the chat messages, or in raw mode their text run together."""
        return "".join(m["content"] for m in self.messages) if self.raw else self.messages

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.reset()
        self.last = None
        self.attached = []


def stats_line(r, reused: int) -> str:
    """One line per answer: speed, MTP acceptance and how much of the prompt the cache spared."""
    parts = [f"{r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s"]
    if (d := r.draft) is not None:
        parts.append(f"mean accepted length {d.mean_accepted_length:.2f} ({d.rounds} drafting rounds)")
    parts.append(f"prompt cache: reused {reused} of {r.prompt_tokens} tokens")
    return " | ".join(parts)


def answer(bundle, chat: Chat, text: str, args, sampler: SamplerConfig, out) -> None:
    """Stream the answer to `text`; Ctrl-C stops it, keeping what was shown as the assistant's message."""
    from .. import stream_generate

    content = [*chat.attached, {"type": "text", "text": text}] if chat.attached else text
    chat.messages.append({"role": "user", "content": text + "\n" if chat.raw else content})
    kwargs = {"enable_thinking": True} if args.thinking and not chat.raw else None
    responses = stream_generate(bundle, chat.prompt(), args.max_tokens, sampler, args.num_draft_tokens,
                                chat_template_kwargs=kwargs, prompt_cache=chat.cache)
    printer, shown, last, interrupted = ChannelPrinter(out), [], None, False
    try:
        try:
            first = next(responses, None)  # a bad attachment or prompt fails here, before anything is shown
        except ValueError as e:
            chat.messages.pop()  # the conversation goes on without the message that failed
            dropped = " (attachments dropped)" if chat.attached else ""
            chat.attached = []
            _dim(out, f"error: {e}{dropped}")
            return
        chat.attached = []
        for last in itertools.chain([first] if first is not None else [], responses):
            printer.write(last.channel, last.text)
            if last.channel == "answer":
                shown.append(last.text)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        responses.close()  # a stopped answer still leaves the cache holding what was generated
    printer.end()
    # the answer alone: Gemma 4's template strips earlier turns' thoughts anyway
    chat.messages.append({"role": "assistant", "content": "".join(shown)})
    chat.last = last or chat.last
    if last is not None:
        note = " (stopped)" if interrupted else ""
        _dim(out, stats_line(last, chat.cache.reused) + note)


def attach(chat: Chat, bundle, command: str, argument: str, out) -> None:
    """`/image PATH`, `/video PATH` or `/audio PATH`: the file goes with the next message (checked to exist now)."""
    from pathlib import Path

    kind = MEDIA_COMMANDS[command]
    path = Path(argument.strip()).expanduser()
    if chat.raw or bundle.media is None:
        _dim(out, f"error: {bundle.path.name} takes no images or audio (no chat template or no vision tower)")
    elif kind == "audio" and not bundle.media.takes_audio:
        _dim(out, f"error: {bundle.path.name} takes no audio (only E2B and E4B have an audio tower)")
    elif not argument.strip() or not path.is_file():
        _dim(out, f"error: {command} needs the path of a file ({argument.strip() or 'none given'})")
    else:
        chat.attached.append({"type": kind, kind: str(path)})
        _dim(out, f"attached {path.name} ({kind}) to your next message")


def _dim(out, line: str) -> None:
    tty = out.isatty()
    out.write(f"{ChannelPrinter.DIM}{line}{ChannelPrinter.RESET}\n" if tty else line + "\n")
    out.flush()


def run_chat(bundle, args, input_fn=input, out=None) -> Chat:
    """The REPL: reads lines with `input_fn` until /exit, /quit or EOF, writing answers to `out` (stdout).

    Returns the conversation as it ended (its messages and prompt cache).
    """
    out = sys.stdout if out is None else out
    if bundle.tokenizer is None:
        raise ValueError(f"{bundle.path} has no tokenizer files; chat needs a checkpoint with a tokenizer")
    raw = not bundle.tokenizer.has_chat_template
    sampler, chat = sampler_from(args, bundle), Chat(system=None if raw else args.system, raw=raw)
    if raw:
        _dim(out, f"{bundle.path.name} has no chat template: each line you type is added to one text, which the "
                  "model continues (an instruction-tuned checkpoint chats)")
    _dim(out, HELP)
    while True:
        try:
            line = input_fn(">> ")
        except EOFError:
            out.write("\n")
            break
        except KeyboardInterrupt:  # at the prompt: drop the line, like Python's REPL
            out.write("\n")
            continue
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            chat.reset()
            _dim(out, "new conversation")
        elif command.split(" ", 1)[0] in MEDIA_COMMANDS:
            name, _, argument = command.partition(" ")
            attach(chat, bundle, name, argument, out)
        elif command == "/stats":
            _dim(out, format_stats(chat.last) if chat.last is not None else "no answer yet")
        elif command:
            answer(bundle, chat, line, args, sampler, out)
    return chat
