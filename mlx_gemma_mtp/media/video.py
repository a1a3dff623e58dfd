"""Videos for Gemma 4: decoding (PyAV), frame sampling and the reference video processor, unpadded.

Reference: transformers `video_utils.py` (`read_video_pyav`, `default_sample_indices_fn`,
`VideoMetadata.timestamps`), `models/gemma4/video_processing_gemma4.py` (`Gemma4VideoProcessor`) and
`Gemma4Processor.replace_video_token`. A video becomes up to `num_frames` (32) frames sampled uniformly
(frame `i * total // n`); each frame is processed like an image with its own, smaller budget (`max_soft_tokens`
70: aspect-preserving resize, rescale, 16-pixel patches with their (x, y) positions) and enters the prompt as
"mm:ss <|image>" + its soft tokens (the video token) + "<image|>", the frames joined by spaces.

Two differences from HF, both deliberate: a video with fewer frames than `num_frames` gives all its frames (HF
refuses it), and frames are resized with Pillow's bicubic filter where HF calls torch's antialiased bicubic on
uint8 (a port of Pillow's: values differ by at most 2/255, on under 1% of them; HF's own result changes with the
CPU, AVX2 or not). HF pads every frame to the full patch budget; we keep each frame's own patches.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .image import PIXEL_SETTINGS, ImageFeatures, check_pixel_settings, load_image, settings, target_size

DEFAULT_FPS = 24.0  # HF's `replace_video_token` assumes it for frames that come without a rate
_NULLABLE = ("num_frames", "fps")
INSTALL_HINT = ("decoding a video file needs PyAV: pip install 'mlx-gemma-mtp[video]' (or pip install av); or "
                "send decoded frames: {'type': 'video', 'video': (frames, fps)}")


@dataclass(frozen=True)
class Video:
    """Sampled frames of one video: upright RGB images, and the time of each in seconds."""

    frames: list[Image.Image]
    timestamps: tuple[float, ...]


def load_video(source: Any, sample: Any) -> Video:
    """The frames `sample(total, fps)` picks (their indices) from a video file (path or bytes, decoded with PyAV)
    or from decoded frames: a list of PIL images / arrays, a (F, H, W[, C]) array, or `(frames, fps)`.

    Frames given without a rate are taken to be `DEFAULT_FPS` apart, as HF does.

    Raises:
        ValueError: a missing or unreadable file, no frames, PyAV missing for a file, or frames of mixed sizes.
    """
    if isinstance(source, tuple):
        if len(source) != 2 or not _is_rate(source[1]):
            raise ValueError("a video given as a tuple must be (frames, fps) with a positive frames-per-second")
        return _from_frames(source[0], float(source[1]), sample)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), f"the video data ({len(source)} bytes)", sample)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"video file not found: {path}" if not path.exists()
                             else f"{path} is not a file (a video path must name a file)")
        return _decode(str(path), str(path), sample)
    if isinstance(source, (list, np.ndarray)):
        return _from_frames(source, DEFAULT_FPS, sample)
    raise ValueError(f"cannot read a video from a {type(source).__name__}: pass a path, the file's bytes, a "
                     "list of frames (PIL images or arrays), an (F, H, W, C) array or (frames, fps)")


def _is_rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0


def _from_frames(frames, fps: float, sample) -> Video:
    if isinstance(frames, np.ndarray) and frames.ndim not in (3, 4):
        raise ValueError(f"a video array must be (F, H, W) or (F, H, W, C); got shape {frames.shape}")
    if len(frames) == 0:
        raise ValueError("the video has no frames")
    indices = sample(len(frames), fps)
    return _video([load_image(frames[i]) for i in indices], indices, fps)


def _video(frames: list[Image.Image], indices: Sequence[int], fps: float) -> Video:
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"the video's frames differ in size ({sorted(sizes)}); every frame must have one size")
    return Video(frames, tuple(i / fps for i in indices))


def _decode(file, what: str, sample) -> Video:
    try:
        import av
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    try:
        with av.open(file) as container:
            if not container.streams.video:
                raise ValueError(f"{what} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else DEFAULT_FPS
            # as HF's read_video_pyav: the header's frame count; some containers (GIF, WebM) leave it 0
            total = stream.frames or sum(1 for _ in container.decode(video=0))
            if total == 0:
                raise ValueError(f"{what} has no video frames")
            indices = sample(total, fps)
            container.seek(0)
            wanted, frames = set(indices), []
            for i, frame in enumerate(container.decode(video=0)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames.append(Image.fromarray(frame.to_ndarray(format="rgb24")))
    except av.FFmpegError as e:
        raise ValueError(f"{what} could not be decoded as a video: {e}") from None
    if len(frames) < len(indices):  # the header promised more frames than the stream holds
        raise ValueError(f"{what} is damaged: {total} frames announced, {len(frames)} of the sampled ones decoded")
    return _video(frames, indices, fps)


@dataclass
class VideoFeatures:
    """One processed video: each frame's patches (all frames share one size, so one position grid)."""

    pixel_values: np.ndarray  # (F, P, 3 * patch_size**2) float32, each patch (row, column, channel)
    position_ids: np.ndarray  # (P, 2) int32, each patch's (x, y) in the patch grid, row-major
    timestamps: tuple[float, ...]  # seconds, one per frame
    num_soft_tokens: int  # per frame: P // pooling_kernel_size**2

    def frame(self, i: int) -> ImageFeatures:
        """Frame i as the vision tower reads an image."""
        return ImageFeatures(self.pixel_values[i], self.position_ids, self.num_soft_tokens)


def timestamp_text(seconds: float) -> str:
    """HF's "mm:ss" of a frame (`replace_video_token`)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def video_text(features: VideoFeatures, boi: str, video: str, eoi: str) -> str:
    """What HF's `Gemma4Processor.replace_video_token` writes for one video's placeholder."""
    soft = video * features.num_soft_tokens
    return " ".join(f"{timestamp_text(t)} {boi}{soft}{eoi}" for t in features.timestamps)


@dataclass
class VideoProcessor:
    """HF's Gemma4VideoProcessor settings, with its defaults."""

    patch_size: int = 16
    max_soft_tokens: int = 70
    pooling_kernel_size: int = 3
    num_frames: int | None = 32
    fps: float | None = None  # sample this many frames per second instead (with num_frames null)
    do_sample_frames: bool = True
    do_resize: bool = True
    resample: int = Image.Resampling.BICUBIC.value
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True  # with mean 0 and std 1: the rescale alone, as HF fuses the two
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def from_config(cls, d: dict) -> VideoProcessor:
        """From `processor_config.json`'s "video_processor" section (HF's defaults where a key or the section is
        absent: a flat `preprocessor_config.json` holds the image processor's settings, not these)."""
        section = d.get("video_processor") or {}
        if not isinstance(section, dict):
            raise ValueError("processor config: video_processor must be a JSON object")  # noqa: TRY004
        # null means "unset" except for num_frames / fps, where it picks the other way of sampling
        processor = cls(**settings(section, (*PIXEL_SETTINGS, "num_frames", "fps", "do_sample_frames"), _NULLABLE))
        processor.validate()
        return processor

    def validate(self) -> None:
        check_pixel_settings(self, "video processor")
        if self.num_frames is not None and self.fps is not None:  # HF's sample_frames refuses both too
            raise ValueError("video processor: num_frames and fps are exclusive; set one of them to null")
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames <= 0):
            raise ValueError(f"video processor: num_frames={self.num_frames!r} must be a positive integer")
        if self.fps is not None and not _is_rate(self.fps):
            raise ValueError(f"video processor: fps={self.fps!r} must be a positive number")

    def frame_indices(self, total: int, fps: float) -> list[int]:
        """HF's `default_sample_indices_fn`: n frames at `i * total // n`; all of them when there are fewer than
        n (HF refuses such a video) or sampling is off."""
        if not self.do_sample_frames:
            return list(range(total))
        n = self.num_frames if self.num_frames is not None else max(1, int(total / fps * self.fps))
        n = min(n, total)
        return [i * total // n for i in range(n)]

    def __call__(self, source: Any) -> VideoFeatures:
        """Decode, sample and process one video (anything `load_video` takes)."""
        video = load_video(source, self.frame_indices)
        width, height = video.frames[0].size
        if self.do_resize:
            height, width = target_size(height, width, self.patch_size,
                                        self.max_soft_tokens * self.pooling_kernel_size**2, self.pooling_kernel_size)
        elif height % (side := self.patch_size * self.pooling_kernel_size) or width % side:
            raise ValueError(f"with do_resize off, a frame's sides must be multiples of {side}; got {width}x{height}")
        frames = np.stack([self._pixels(f, width, height) for f in video.frames])  # (F, H, W, 3) float32
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = frames.reshape(len(frames), rows, p, cols, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x, y = np.meshgrid(np.arange(cols, dtype=np.int32), np.arange(rows, dtype=np.int32), indexing="xy")
        return VideoFeatures(np.ascontiguousarray(patches.reshape(len(frames), rows * cols, p * p * 3)),
                             np.stack([x, y], axis=-1).reshape(rows * cols, 2), video.timestamps,
                             rows * cols // self.pooling_kernel_size**2)

    def _pixels(self, frame: Image.Image, width: int, height: int) -> np.ndarray:
        if frame.size != (width, height):
            frame = frame.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(frame).astype(np.float32)
        if self.do_normalize:  # HF fuses rescale into normalize, in float32: (x - mean / r) / (std / r)
            scale = np.float32(1.0 / self.rescale_factor) if self.do_rescale else np.float32(1.0)
            mean = np.array(self.image_mean, np.float32) * scale
            std = np.array(self.image_std, np.float32) * scale
            return (pixels - mean) / std
        return pixels * np.float32(self.rescale_factor) if self.do_rescale else pixels
