"""Images, videos and audio in chat messages: which content parts hold media, and where each item's bytes come from.

Accepted parts (OpenAI's and HF's spellings), kept in the order the client sent them (the template renders them
in that order; moving audio after the text would be a different prompt):

- image: `{"type": "image", "image" | "url" | "path": SOURCE}`, `{"type": "image_url", "image_url": {"url": URL}}`
  (or `"image_url": URL`)
- audio: `{"type": "audio", "audio" | "url" | "path": SOURCE}`,
  `{"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}`
- video: `{"type": "video", "video" | "url" | "path": SOURCE}`, `{"type": "video_url", "video_url": {"url": URL}}`
  (vLLM's spelling)

An image or video part may set its own token budget (soft tokens per image or video frame: 70, 140, 280, 560
or 1120; the checkpoint's processor config gives the default, 280 per image and 70 per frame on the released
ones): `"max_soft_tokens": N` in the part, or OpenAI's `"detail"` in `image_url` / `video_url` ("low": 70,
"high": 1120, "auto": the default).

SOURCE is a `data:` URL, a local path (when `local_files` allows it; a server refuses them unless started with
`--allow-local-media`), raw bytes of a file, a PIL image, a numpy array (audio: `(array, sampling_rate)` too; video: a list of frames, an
(F, H, W, C) array, or `(frames, fps)`).
Nothing is fetched from the network: an `http(s)://` URL is refused with a message saying what to send instead.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE, AUDIO, VIDEO = "image", "audio", "video"
# soft tokens per image or frame: HF's Gemma4 processors refuse any other budget (the ones the model was trained with)
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DETAIL = {"low": 70, "high": 1120, "auto": None}  # OpenAI's image detail levels as budgets (None: the default)
_KINDS = {"image": IMAGE, "image_url": IMAGE, "audio": AUDIO, "input_audio": AUDIO, "video": VIDEO,
          "video_url": VIDEO}
_SOURCE_KEYS = ("image", "audio", "video", "url", "path", "image_url", "input_audio", "video_url")


@dataclass(frozen=True)
class MediaItem:
    """One image, video or audio clip of a prompt, not yet decoded: `source` is bytes, a path, an image, an
    array or frames."""

    kind: str  # IMAGE, VIDEO or AUDIO
    source: Any
    where: str  # how errors name it: "messages[0].content[1]"
    max_soft_tokens: int | None = None  # images and videos: soft tokens per image / frame (None: the processor's)


def split_media(messages: list, local_files: bool = True) -> tuple[list, list[MediaItem]]:
    """(messages for the chat template, the media items in order). In the returned messages each media part is
    `{"type": "image"}`, `{"type": "video"}` or `{"type": "audio"}` (the template writes one placeholder for it);
    text is untouched.

    Raises:
        ValueError: a media part without a usable source, naming the part and what to send instead.
    """
    rendered, items = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            rendered.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = _KINDS.get(part.get("type")) if isinstance(part, Mapping) else None
            if kind is None:
                parts.append(part)
                continue
            where = f"messages[{i}].content[{j}]"
            items.append(MediaItem(kind, _source(part, kind, where, local_files), where, _budget(part, kind, where)))
            parts.append({"type": kind})
        rendered.append({**message, "content": parts})
    return rendered, items


def has_media(messages) -> bool:
    """Whether any message holds an image, video or audio part (cheap: nothing is decoded)."""
    return isinstance(messages, (list, tuple)) and any(
        isinstance(m, Mapping) and isinstance(m.get("content"), list)
        and any(isinstance(p, Mapping) and p.get("type") in _KINDS for p in m["content"])
        for m in messages
    )


def _budget(part: Mapping, kind: str, where: str) -> int | None:
    """The part's own soft-token budget: `max_soft_tokens`, or OpenAI's `detail` in `image_url` / `video_url`."""
    nested = next((part[k] for k in ("image_url", "video_url") if isinstance(part.get(k), Mapping)), {})
    budget, detail = part.get("max_soft_tokens"), nested.get("detail", part.get("detail"))
    if detail is not None:
        if detail not in DETAIL:
            raise ValueError(f"{where}: detail={detail!r} must be one of {sorted(DETAIL)} (low: 70 soft tokens, "
                             "high: 1120, auto: the checkpoint's default)")
        budget = DETAIL[detail] if budget is None else budget
    if budget is None:
        return None
    if kind == AUDIO:
        raise ValueError(f"{where}: max_soft_tokens / detail apply to images and videos; an audio clip's tokens "
                         "follow its length")
    if budget not in SUPPORTED_SOFT_TOKENS or isinstance(budget, bool):
        raise ValueError(f"{where}: max_soft_tokens={budget!r} must be one of {SUPPORTED_SOFT_TOKENS}")
    return budget


def _source(part: Mapping, kind: str, where: str, local_files: bool):
    value = next((part[k] for k in _SOURCE_KEYS if part.get(k) is not None), None)
    if isinstance(value, Mapping):  # {"image_url" | "video_url": {"url": ...}} / {"input_audio": {"data": ...}}
        if "url" in value:
            value = value["url"]
        elif "data" in value:
            return _base64(value["data"], f"{where}.input_audio.data")
        else:
            raise ValueError(f"{where}: expected {{'url': ...}} or {{'data': BASE64, 'format': 'wav'}}, got "
                             f"keys {sorted(value)}")
    if value is None:
        raise ValueError(f"{where}: a {kind} part needs its content: {{'type': '{kind}', '{kind}': PATH, bytes or "
                         f"array}}, or a data: URL")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Path):
        return _local(str(value), where, local_files)
    if isinstance(value, str):
        return _string(value, where, local_files)
    return value  # a PIL image or an array: the decoder checks it


def _string(value: str, where: str, local_files: bool):
    if value.startswith("data:"):
        header, sep, data = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"{where}: a data: URL must be base64 (data:image/png;base64,...)")
        return _base64(data, where)
    if value.startswith(("http://", "https://")):
        raise ValueError(f"{where}: {value[:60]!r} is a web URL; nothing is fetched from the network: download "
                         "it and send its bytes (a data: URL) or, locally, its path")
    return _local(value.removeprefix("file://"), where, local_files)


def _local(path: str, where: str, local_files: bool) -> str:
    if not local_files:
        raise ValueError(f"{where}: local file paths are not accepted here (the server was not started with "
                         "--allow-local-media); send the file's bytes as a data: URL")
    return path


def _base64(data, where: str) -> bytes:
    if not isinstance(data, str):
        raise ValueError(f"{where}: expected a base64 string, got {type(data).__name__}")  # noqa: TRY004  (a request error: the server answers 400)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: not valid base64 ({e})") from None
