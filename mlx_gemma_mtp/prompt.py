"""Prompts as the released Gemma 4 checkpoints expect them (docs/real-checkpoints.md).

- Raw text: Gemma 4's tokenizer has `add_bos_token` false and BOS (`<bos>`, id 2) comes only from the chat
  template, so a raw text prompt gets `<bos>` prepended here unless it already starts with it; without it Gemma
  produces garbage.
- Chat messages: rendered by the checkpoint's own template (`chat_template` in `tokenizer_config.json` or a
  separate `chat_template.jinja`), never a guessed one. Template options (`enable_thinking`, ...) are passed
  through; thinking is off unless asked for, as in Google's templates (mlx-lm's wrapper would switch it on for
  any tokenizer that has `<|channel>`).
- Token ids (a list, or a 1-D numpy / MLX integer array): used exactly as given.
- Images, videos and audio: content parts of chat messages (`media/content.py`); the template writes one
  placeholder per part, expanded to the item's soft tokens (`media/placeholders.py`; a video's in the rendered
  text, since its frame times are text). The result is an `EncodedPrompt`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Prompt = str | list[int] | list[dict]
CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"  # Gemma 4's thought channel: <|channel>thought\n…<channel|>


@dataclass(frozen=True)
class Span:
    """An image, a video frame or an audio clip in an encoded prompt: its soft tokens are
    `ids[start:start + length]`."""

    kind: str  # "image", "video" (one frame) or "audio"
    start: int
    length: int
    digest: int  # hash of the processed item (pixels / features): what tells two same-sized items apart
    inputs: Any  # what its tower reads: media.image.ImageFeatures (images, video frames) or AudioFeatures

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as the model reads it: token ids, and where images and audio replace placeholder tokens."""

    ids: list[int]
    spans: tuple[Span, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def keys(self) -> list[int]:
        """The ids with each item's soft tokens replaced by a negative number from its digest: two different
        images expand to the same placeholder ids, so a prompt cache must compare these, not the ids."""
        keys = list(self.ids)
        for span in self.spans:
            keys[span.start : span.end] = [-1 - span.digest] * span.length
        return keys

    def span_inside(self, position: int) -> Span | None:
        """The span that `position` falls strictly inside of (not at its start), if any."""
        return next((s for s in self.spans if s.start < position < s.end), None)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the decoding loop needs from the tokenizer; None where the tokenizer has no such token."""

    bos: int | None = None
    channel_start: int | None = None
    channel_end: int | None = None

    @property
    def channels(self) -> tuple[int, int] | None:
        """(<|channel>, <channel|>) when the model writes channels (Gemma 4 thinking), else None."""
        if self.channel_start is None or self.channel_end is None:
            return None
        return self.channel_start, self.channel_end


def _token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if it is a single token of the vocabulary (not the unknown token it would map to)."""
    i = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(i, int) or tokenizer.convert_ids_to_tokens(i) != token:
        return None
    return i


def special_tokens(tokenizer, bos_fallback: int | None = None) -> SpecialTokens:
    """Read BOS and the channel markers from an mlx-lm `TokenizerWrapper` (or an HF tokenizer)."""
    if tokenizer is None:
        return SpecialTokens(bos=bos_fallback)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else bos_fallback
    return SpecialTokens(bos, _token_id(tokenizer, CHANNEL_START), _token_id(tokenizer, CHANNEL_END))


def _as_token_ids(prompt) -> list[int] | None:
    """A 1-D array or list of integers as a list of ints, else None (not a token-id prompt)."""
    if hasattr(prompt, "dtype") and hasattr(prompt, "shape") and not isinstance(prompt, str):
        array = np.asarray(prompt)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"an array prompt must be a 1-D array of integer token ids, got shape "
                             f"{tuple(array.shape)} and dtype {array.dtype}")
        return [int(t) for t in array]
    if isinstance(prompt, (list, tuple)) and prompt and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt
    ):
        return [int(t) for t in prompt]
    return None


def _check_messages(messages: list) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"chat message {i} is a {type(m).__name__}; each message is a dict with 'role' and "
                             "'content'")
        if not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"chat message {i} ({dict(m)!r:.80}) needs a string 'role' and a 'content'")


def _encode_text(tokenizer, special: SpecialTokens, text: str) -> list[int]:
    ids = list(tokenizer.encode(text))
    bos = special.bos
    if bos is None:
        return ids
    if ids[:1] != [bos]:
        return [bos, *ids]
    if ids[:2] == [bos, bos] and text.startswith(tokenizer.bos_token or "\0"):
        return ids[1:]  # the tokenizer added BOS and the text spelled it out too
    return ids


def _render_chat(tokenizer, messages: list, chat_template_kwargs: dict | None,
                 rewrite: Callable[[str], str] | None = None) -> list[int]:
    if not getattr(tokenizer, "has_chat_template", False):
        raise ValueError("this checkpoint has no chat template (no 'chat_template' in tokenizer_config.json and "
                         "no chat_template.jinja); pass the prompt as text or as token ids")
    kwargs = dict(chat_template_kwargs or {})
    kwargs.setdefault("enable_thinking", False)
    reserved = {"add_generation_prompt", "tokenize", "conversation", "messages"} & kwargs.keys()
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {sorted(reserved)}; they are set by generation")
    if rewrite is None:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
    # what apply_chat_template does when it tokenizes, with the text changed in between
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return list(tokenizer.encode(rewrite(text), add_special_tokens=False))


def prompt_ids(tokenizer, special: SpecialTokens, prompt: Any, chat_template_kwargs: dict | None = None,
               where: str = "the checkpoint", rewrite: Callable[[str], str] | None = None) -> list[int]:
    """Token ids of `prompt`: text (BOS added as needed), chat messages (the checkpoint's template) or token ids.
    `rewrite`: applied to chat messages' rendered text before it is tokenized (videos' placeholders).

    Raises:
        ValueError: naming what is wrong with the prompt and what to pass instead.
    """
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
        raise ValueError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
    if isinstance(prompt, Mapping):
        raise ValueError("a single chat message was passed; pass a list of messages: [{'role': 'user', ...}]")
    ids = _as_token_ids(prompt)
    if ids is not None:
        return ids
    is_chat = isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], Mapping)
    if not isinstance(prompt, str) and not is_chat:
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (list, tuple)) for t in prompt):
            raise ValueError("batch size is 1: pass one prompt (a list of token ids), not a list of prompts")
        raise ValueError("prompt must be a non-empty string, list of chat messages or list of token ids, got "
                         f"{type(prompt).__name__} {prompt!r:.60}")
    if tokenizer is None:
        raise ValueError(f"{where} has no tokenizer files; pass the prompt as a list of token ids")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is an empty string")
        return _encode_text(tokenizer, special, prompt)
    _check_messages(prompt)
    return _render_chat(tokenizer, list(prompt), chat_template_kwargs, rewrite)
