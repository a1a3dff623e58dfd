"""Placeholder expansion, as HF's `Gemma4Processor` does it: the chat template writes one image (audio) token per
content part; each becomes `<|image>` + n image tokens + `<image|>` (`<|audio>` … `<audio|>`), n being the
item's number of soft tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..prompt import EncodedPrompt, Span
from .content import AUDIO, IMAGE

# config.json keys of the placeholder ids (HF saves the audio end as `eoa_token_index`, the hub files both), and
# the released values (docs/real-checkpoints.md)
_IDS = {"image": (("image_token_id",), 258880), "boi": (("boi_token_id",), 255999),
        "eoi": (("eoi_token_id",), 258882), "audio": (("audio_token_id",), 258881),
        "boa": (("boa_token_id",), 256000), "eoa": (("eoa_token_id", "eoa_token_index"), 258883)}


@dataclass(frozen=True)
class MediaTokens:
    image: int
    boi: int
    eoi: int
    audio: int
    boa: int
    eoa: int

    @classmethod
    def from_config(cls, config: dict) -> MediaTokens:
        """The ids of the checkpoint's outer config.json, the released ones where a key is absent."""
        values = {}
        for name, (keys, default) in _IDS.items():
            key = next((k for k in keys if config.get(k) is not None), keys[0])
            value = config.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config.json: {key}={value!r} must be a token id")
            values[name] = value
        return cls(**values)

    def bracket(self, kind: str) -> tuple[int, int, int]:
        """(begin, soft token, end) ids of `kind`."""
        return (self.boi, self.image, self.eoi) if kind == IMAGE else (self.boa, self.audio, self.eoa)


@dataclass(frozen=True)
class Prepared:
    """A decoded, processed media item: what its tower reads, how many soft tokens it becomes, its digest."""

    kind: str
    inputs: Any  # ImageFeatures / AudioFeatures
    length: int
    digest: int


def expand(ids: Sequence[int], items: Sequence[Prepared], tokens: MediaTokens) -> EncodedPrompt:
    """`ids` (the rendered template) with the k-th placeholder of each kind expanded for the k-th item of it.

    Raises:
        ValueError: the template wrote a different number of placeholders than there are items (e.g. the text
            itself spells `<|image|>`, or the template ignores media parts). Each item ends in its end token, so
            the last prompt token is never a soft token (prefill feeds the last token alone).
    """
    queues = {kind: [item for item in items if item.kind == kind] for kind in (IMAGE, AUDIO)}
    placeholder = {tokens.image: IMAGE, tokens.audio: AUDIO}
    out, spans, used = [], [], {IMAGE: 0, AUDIO: 0}
    for token in ids:
        kind = placeholder.get(token)
        if kind is None:
            out.append(token)
            continue
        if used[kind] >= len(queues[kind]):
            raise ValueError(_count_error(kind, ids, tokens, queues))
        item = queues[kind][used[kind]]
        used[kind] += 1
        begin, soft, end = tokens.bracket(kind)
        out.append(begin)
        spans.append(Span(kind, len(out), item.length, item.digest, item.inputs))
        out += [soft] * item.length + [end]
    if any(used[k] != len(queues[k]) for k in used):
        raise ValueError(_count_error(next(k for k in used if used[k] != len(queues[k])), ids, tokens, queues))
    return EncodedPrompt(out, tuple(spans))


def _count_error(kind: str, ids, tokens: MediaTokens, queues) -> str:
    written = sum(1 for t in ids if t == (tokens.image if kind == IMAGE else tokens.audio))
    return (f"the prompt has {written} {kind} placeholder(s) for {len(queues[kind])} {kind}(s): each {kind} content "
            f"part becomes one placeholder; do not write the placeholder token yourself, and use the checkpoint's "
            f"own chat template (it must render {kind} parts)")
