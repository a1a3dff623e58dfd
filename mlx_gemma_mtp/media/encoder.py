"""What a bundle needs to take images, videos and audio: the checkpoint's processors, its placeholder ids, and its
towers, loaded on first use so text-only work never pays their memory (E2B's vision + audio towers: 0.95 GB in
bf16)."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..models.gemma4_text import MediaRows
from ..models.towers import Towers
from ..prompt import EncodedPrompt, Span
from .content import AUDIO, IMAGE, VIDEO, MediaItem
from .placeholders import MediaTokens, Prepared

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def read_processor_config(path: Path) -> dict:
    """The first of `processor_config.json` (transformers 5: sections per processor) and
    `preprocessor_config.json` (flat) that the folder has; {} (the reference defaults) when neither."""
    from ..load import read_json_object  # load imports this module

    for name in PROCESSOR_FILES:
        if (path / name).is_file():
            return read_json_object(path / name)
    return {}


def digest(*arrays: np.ndarray) -> int:
    """A 60-bit content hash of processed inputs (what the tower reads), for the prompt cache's keys."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") >> 4


def _tower_geometry(processor_config: dict, vision_config: dict, name: str = "image_processor") -> dict:
    """The processor settings with the tower's patch and pooling sizes where the processor's file leaves them out
    (or the checkpoint has none): pixels cut any other way would not fit the tower. A file that disagrees with
    the tower is refused. `name`: the section (images: also a flat file; videos: only their own section)."""
    nested = name in processor_config or name != "image_processor"
    section = dict(processor_config.get(name) or {}) if nested else dict(processor_config)
    for key, default in (("patch_size", 16), ("pooling_kernel_size", 3)):
        tower = vision_config.get(key, default)
        if section.get(key) is None:
            section[key] = tower
        elif section[key] != tower:
            raise ValueError(f"the processor config says {key}={section[key]} but config.json's vision_config "
                             f"says {tower}: the files belong to different checkpoints")
    return {**processor_config, name: section} if nested else section


class MediaEncoder:
    """Processors, placeholder ids and (lazily) towers of one multimodal checkpoint.

    `load_towers` returns the loaded `Towers`; it runs once, on the first prompt with media."""

    def __init__(self, config: dict, processor_config: dict, load_towers: Callable[[], Towers],
                 bidirectional_images: bool):
        from .image import ImageProcessor
        from .video import VideoProcessor

        self.tokens = MediaTokens.from_config(config)
        vision = config["vision_config"]
        self.image_processor = ImageProcessor.from_config(_tower_geometry(processor_config, vision))
        self.video_processor = VideoProcessor.from_config(_tower_geometry(processor_config, vision, "video_processor"))
        self.audio_extractor = None
        if isinstance(config.get("audio_config"), dict):
            from .audio import AudioFeatureExtractor

            self.audio_extractor = AudioFeatureExtractor.from_config(processor_config)
        self.bidirectional_images = bidirectional_images
        self._load_towers, self._towers, self._lock = load_towers, None, threading.Lock()

    @property
    def takes_audio(self) -> bool:
        return self.audio_extractor is not None

    @property
    def towers(self) -> Towers:
        with self._lock:  # two first requests at once load once
            if self._towers is None:
                self._towers = self._load_towers()
        return self._towers

    def prepare(self, item: MediaItem) -> Prepared:
        """Decode and process one item (host work, before the model is taken).

        Raises:
            ValueError: the item cannot be decoded, or this checkpoint has no tower for its kind.
        """
        if item.kind == IMAGE:
            from .image import load_image

            processor = self.image_processor
            if item.max_soft_tokens is not None:
                processor = dataclasses.replace(processor, max_soft_tokens=item.max_soft_tokens)
            try:
                features = processor(load_image(item.source))
            except ValueError as e:
                raise ValueError(f"{item.where}: {e}") from None
            return Prepared(IMAGE, features, features.num_soft_tokens,
                            digest(features.pixel_values, features.position_ids))
        if item.kind == VIDEO:
            return self._prepare_video(item)
        if not self.takes_audio:
            raise ValueError(f"{item.where}: this checkpoint takes no audio (no audio_config; only E2B and E4B "
                             "have an audio tower); send text or images")
        from .audio import load_audio

        try:
            features = self.audio_extractor(load_audio(item.source, self.audio_extractor.sampling_rate))
        except ValueError as e:
            raise ValueError(f"{item.where}: {e}") from None
        if features.truncated:  # as HF's feature extractor does, silently there
            seconds = self.audio_extractor.max_samples / self.audio_extractor.sampling_rate
            warnings.warn(f"{item.where}: the clip is longer than {seconds:g} s, the most the model hears; only "
                          "its start is used (split longer audio into several clips)", stacklevel=2)
        return Prepared(AUDIO, features, features.num_soft_tokens, digest(features.features, features.mask))

    def _prepare_video(self, item: MediaItem) -> Prepared:
        processor = self.video_processor
        if item.max_soft_tokens is not None:
            processor = dataclasses.replace(processor, max_soft_tokens=item.max_soft_tokens)
        try:
            features = processor(item.source)
        except ValueError as e:
            raise ValueError(f"{item.where}: {e}") from None
        frames = tuple(digest(frame, features.position_ids) for frame in features.pixel_values)
        return Prepared(VIDEO, features, features.num_soft_tokens, digest(features.pixel_values), frames)

    def features(self, span: Span) -> mx.array:
        """The span's soft tokens in the text model's embedding space, (length, hidden), lazily. A video's span
        is one frame, which the vision tower reads as an image (HF: `get_video_features`)."""
        towers, x = self.towers, span.inputs
        if span.kind in (IMAGE, VIDEO):
            return towers.image_features(mx.array(x.pixel_values)[None], mx.array(x.position_ids)[None])
        return towers.audio_features(mx.array(x.features)[None], mx.array(x.mask)[None], span.length)


class PromptMedia:
    """The media of one encoded prompt, as prefill consumes it: chunk ends that split no item, and each chunk's
    soft tokens (computed by the towers when the chunk is fed)."""

    def __init__(self, prompt: EncodedPrompt, encoder: MediaEncoder):
        self.spans, self.encoder = prompt.spans, encoder

    def cut(self, start: int, end: int) -> int:
        """The end to use for a chunk [start, end): an item's soft tokens go in one forward (an image's or a video
        frame's see each other there), so an end inside one moves before it, or past it when it starts the chunk."""
        for span in self.spans:
            if span.start < end < span.end:
                return span.start if span.start > start else span.end
        return end

    def rows(self, start: int, end: int) -> MediaRows | None:
        inside = [s for s in self.spans if start <= s.start and s.end <= end]
        if not inside:
            return None
        rows = tuple((s.start - start, self.encoder.features(s)) for s in inside)
        bidirectional = self.encoder.bidirectional_images
        # HF's blocks: each run of image or video tokens (one image, one frame) attends within itself
        blocks = tuple((s.start, s.end) for s in inside if s.kind in (IMAGE, VIDEO) and bidirectional)
        return MediaRows(rows, blocks)
