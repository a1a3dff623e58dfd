"""Placeholder expansion, as HF's `Gemma4Processor` does it: the chat template writes one image (audio) token per
content part; each becomes `<|image>` + n image tokens + `<image|>` (`<|audio>` … `<audio|>`), n being the
item's number of soft tokens. A video's placeholder becomes text (each frame's "mm:ss" time, then `<|image>` + n
video tokens + `<image|>`), so it is replaced in the rendered text before tokenizing, as HF does: the times are
tokenized with the text around them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..prompt import EncodedPrompt, Span
from .content import AUDIO, IMAGE, VIDEO

# config.json keys of the placeholder ids (HF saves the audio end as `eoa_token_index`, the hub files both), and
# the released values (docs/real-checkpoints.md)
_IDS = {"image": (("image_token_id",), 258880), "boi": (("boi_token_id",), 255999),
        "eoi": (("eoi_token_id",), 258882), "audio": (("audio_token_id",), 258881),
        "boa": (("boa_token_id",), 256000), "eoa": (("eoa_token_id", "eoa_token_index"), 258883),
        "video": (("video_token_id",), 258884)}


@dataclass(frozen=True)
class MediaTokens:
    image: int
    boi: int
    eoi: int
    audio: int
    boa: int
    eoa: int
    video: int

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
    inputs: Any  # ImageFeatures / AudioFeatures / VideoFeatures
    length: int  # a video: per frame
    digest: int
    # a video's frames are spans of their own (one prefill piece, one bidirectional block each, as HF's blocks)
    frame_digests: tuple[int, ...] = ()


def expand(ids: Sequence[int], items: Sequence[Prepared], tokens: MediaTokens) -> EncodedPrompt:
    """`ids` (the rendered template) with the k-th placeholder of each kind expanded for the k-th item of it;
    videos come already expanded (`video_rewrite`): each run of video tokens becomes the next frame's span.

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
    spans += _frame_spans(out, [item for item in items if item.kind == VIDEO], tokens.video)
    return EncodedPrompt(out, tuple(sorted(spans, key=lambda s: s.start)))


def _frame_spans(ids: list[int], videos: Sequence[Prepared], video_token: int) -> list[Span]:
    """One span per run of video tokens, matched in order to the videos' frames."""
    runs, start = [], None
    for i, token in enumerate([*ids, None]):
        if token == video_token and start is None:
            start = i
        elif token != video_token and start is not None:
            runs.append((start, i - start))
            start = None
    frames = [(v, f) for v in videos for f in range(len(v.frame_digests))]
    if len(runs) != len(frames) or any(n != v.length for (_, n), (v, _) in zip(runs, frames)):
        raise ValueError(f"the prompt holds {len(runs)} runs of video tokens for {len(frames)} video frames: do not "
                         "write the video placeholder or its tokens yourself")
    return [Span(VIDEO, s, v.length, v.frame_digests[f], v.inputs.frame(f)) for (s, _), (v, f) in zip(runs, frames)]


def video_rewrite(items: Sequence[Prepared], strings: Callable[[int], str], tokens: MediaTokens
                  ) -> Callable[[str], str] | None:
    """What to do to the rendered template's text when there are videos (None when there are none): the k-th
    video placeholder becomes the k-th video's frames, as HF's `replace_video_token`. `strings`: token id ->
    its text in the tokenizer (asked only once the template has rendered)."""
    videos = [item.inputs for item in items if item.kind == VIDEO]
    if not videos:
        return None
    from .video import video_text  # (Pillow is imported with the first media prompt, not with the package)

    def rewrite(text: str) -> str:
        boi, video, eoi = strings(tokens.boi), strings(tokens.video), strings(tokens.eoi)
        pieces = text.split(video)
        if len(pieces) - 1 != len(videos):
            raise ValueError(f"the prompt has {len(pieces) - 1} video placeholder(s) for {len(videos)} video(s): each "
                             "video content part becomes one placeholder; do not write it yourself, and use the "
                             "checkpoint's own chat template (it must render video parts)")
        expanded = (video_text(v, boi, video, eoi) + after for v, after in zip(videos, pieces[1:]))
        return pieces[0] + "".join(expanded)

    return rewrite


def _count_error(kind: str, ids, tokens: MediaTokens, queues) -> str:
    written = sum(1 for t in ids if t == (tokens.image if kind == IMAGE else tokens.audio))
    return (f"the prompt has {written} {kind} placeholder(s) for {len(queues[kind])} {kind}(s): each {kind} content "
            f"part becomes one placeholder; do not write the placeholder token yourself, and use the checkpoint's "
            f"own chat template (it must render {kind} parts)")
