"""Images for Gemma 4: decoding (Pillow) and the reference image processor, unpadded.

Reference: transformers `models/gemma4/image_processing_pil_gemma4.py` (Gemma4ImageProcessorPil) and the helpers it
runs (`image_transforms.convert_to_rgb`, `resize`, `rescale`, `normalize`; `image_utils.load_image`). The processor
resizes each image, keeping its aspect ratio, to the largest size whose sides are multiples of
`patch_size * pooling_kernel_size` within `max_soft_tokens * pooling_kernel_size**2` patches, rescales the pixels
to [0, 1] and cuts the image into row-major patches with their (x, y) grid positions. HF then pads every image to
the full patch budget with (-1, -1) positions; we keep only the image's own patches (HF's first P rows).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .content import SUPPORTED_SOFT_TOKENS


def load_image(source: Any) -> Image.Image:
    """An RGB `PIL.Image.Image` from a path (str / Path), an image file's bytes, a PIL image, or a numpy array
    ((H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; uint8, or float in [0, 1]).

    The EXIF orientation is applied (as HF's `load_image` does for files), so the image is upright. Transparency
    is composited onto white, as HF's processor (`convert_to_rgb`) does: PIL images by `Image.alpha_composite`,
    RGBA arrays by HF's own arithmetic, so each gives HF's pixels for the same input.

    Raises:
        ValueError: a missing file, data that is not an image, an empty image, or an array of the wrong
            shape, dtype or range.
    """
    if isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, Image.Image):
        image = _upright_rgb(source, "the image")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open(io.BytesIO(bytes(source)), f"the image data ({len(source)} bytes)")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"image file not found: {path}" if not path.exists()
                             else f"{path} is not a file (an image path must name a file)")
        image = _open(path, str(path))
    else:
        # ValueError, not TypeError: callers report ValueErrors as the request's fault
        raise ValueError(f"cannot read an image from a {type(source).__name__}: pass a path, the file's "  # noqa: TRY004
                         "bytes, a PIL image or a numpy array")
    return image


def _open(file, what: str) -> Image.Image:
    try:
        with Image.open(file) as im:
            im.load()  # decode now: a truncated or corrupt file fails here, with its name, not later
            return _upright_rgb(im, what)
    except UnidentifiedImageError:
        raise ValueError(f"{what} is not an image Pillow can read (PNG, JPEG, WebP, GIF, ...)") from None
    except Image.DecompressionBombError as e:  # Pillow's guard against huge images (not an OSError)
        raise ValueError(f"{what} is too large to decode: {e}") from None
    except (OSError, SyntaxError) as e:  # Pillow reports damaged data as OSError / SyntaxError
        raise ValueError(f"{what} could not be decoded: {e}") from None


def _upright_rgb(image: Image.Image, what: str) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{what} is empty ({image.width}x{image.height} pixels)")
    # HF's convert_to_rgb: any alpha band, or a palette / grey image with a transparent colour, goes onto white
    transparent = "A" in image.getbands() or image.info.get("transparency") is not None
    image = ImageOps.exif_transpose(image)
    if transparent:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    shape = array.shape
    if not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))):
        hint = " (channels first? pass (H, W, C))" if array.ndim == 3 and shape[0] in (1, 3, 4) else ""
        raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {shape}{hint}")
    if array.size == 0:
        raise ValueError(f"the image array is empty (shape {shape})")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(f"a float image array must hold values in [0, 1]; got [{array.min()}, {array.max()}]")
        pixels = array.astype(np.float64)
    else:
        raise ValueError(f"an image array must be uint8, or float in [0, 1]; got dtype {array.dtype}")
    if pixels.ndim == 3 and shape[2] == 1:
        pixels = pixels[:, :, 0]
    white = 255.0 if pixels.dtype == np.uint8 else 1.0
    if pixels.ndim == 3 and shape[2] == 4:
        # HF's convert_to_rgb for arrays: blend onto white with alpha in [0, 1], rounded back for uint8
        alpha = pixels[..., 3:4] / white
        composite = alpha * pixels[..., :3] + (1 - alpha) * white
        pixels = np.round(composite).astype(np.uint8) if white == 255.0 else composite
    if pixels.dtype != np.uint8:
        pixels = np.round(pixels * 255.0).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels))  # "L" or "RGB"
    return image.convert("RGB")


@dataclass
class ImageFeatures:
    """One processed image: what the vision tower takes, and how many soft tokens it gives."""

    pixel_values: np.ndarray  # (P, 3 * patch_size**2) float32, each patch (row, column, channel)
    position_ids: np.ndarray  # (P, 2) int32, each patch's (x, y) in the patch grid, row-major
    num_soft_tokens: int  # P // pooling_kernel_size**2


def target_size(height: int, width: int, patch_size: int, max_patches: int,
                pooling_kernel_size: int) -> tuple[int, int]:
    """(height, width) HF's `get_aspect_ratio_preserving_size` resizes an image to: the largest with sides
    multiples of patch_size * pooling_kernel_size and at most max_patches patches, in HF's float arithmetic."""
    total_px = height * width
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / total_px)
    side = pooling_kernel_size * patch_size
    target_height = math.floor(factor * height / side) * side
    target_width = math.floor(factor * width / side) * side
    if target_height == 0 and target_width == 0:
        raise ValueError(f"cannot resize a {width}x{height} image to sides that are multiples of {side}")
    # a very thin image: one block thick, as long as its aspect ratio asks, capped at the budget's length
    max_side = (max_patches // pooling_kernel_size**2) * side
    if target_height == 0:
        target_height, target_width = side, min(math.floor(width / height) * side, max_side)
    elif target_width == 0:
        target_height, target_width = min(math.floor(height / width) * side, max_side), side
    if target_height * target_width > target_px:
        raise ValueError(f"resizing a {width}x{height} image to {target_width}x{target_height} exceeds "
                         f"{max_patches} patches of {patch_size}x{patch_size}")
    return target_height, target_width


@dataclass
class ImageProcessor:
    """HF's Gemma4ImageProcessor (PIL backend) settings, with its defaults."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    do_resize: bool = True
    resample: int = Image.Resampling.BICUBIC.value
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False  # Gemma 4 maps [0, 1] to [-1, 1] inside the vision tower instead
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def from_config(cls, d: dict) -> ImageProcessor:
        """From HF's saved settings: `processor_config.json` (the image processor's under "image_processor") or
        a flat `preprocessor_config.json`; absent keys take HF's defaults, unknown keys are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"the processor config must be a JSON object, not {type(d).__name__}")  # noqa: TRY004
        section = d.get("image_processor", d)
        if not isinstance(section, dict):
            raise ValueError("processor config: image_processor must be a JSON object")  # noqa: TRY004
        processor = cls(**settings(section, PIXEL_SETTINGS))
        processor.validate()
        return processor

    def validate(self) -> None:
        check_pixel_settings(self, "image processor")
        for name in ("do_resize", "do_rescale", "do_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"image processor: {name}={getattr(self, name)!r} must be true or false")  # noqa: TRY004
        if not isinstance(self.rescale_factor, (int, float)) or isinstance(self.rescale_factor, bool):
            raise ValueError(f"image processor: rescale_factor={self.rescale_factor!r} must be a number")  # noqa: TRY004

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an upright height x width image is processed at."""
        if height <= 0 or width <= 0:
            raise ValueError(f"the image is empty ({width}x{height} pixels)")
        if not self.do_resize:
            side = self.patch_size * self.pooling_kernel_size
            if height % side or width % side:
                raise ValueError(f"with do_resize off, an image's sides must be multiples of patch_size * "
                                 f"pooling_kernel_size = {side}; got {width}x{height}")
            return height, width
        return target_size(height, width, self.patch_size, self.max_patches, self.pooling_kernel_size)

    def num_soft_tokens(self, height: int, width: int) -> int:
        """Soft tokens of an upright height x width image (after its EXIF orientation is applied)."""
        h, w = self.size_for(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.pooling_kernel_size**2

    def __call__(self, image: Any) -> ImageFeatures:
        """Process one image (anything `load_image` takes)."""
        image = load_image(image)
        height, width = self.size_for(image.height, image.width)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image)  # (H, W, 3) uint8
        if self.do_rescale:  # as HF: multiply in float64, then store float32
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
        x, y = np.meshgrid(np.arange(cols, dtype=np.int32), np.arange(rows, dtype=np.int32), indexing="xy")
        positions = np.stack([x, y], axis=-1).reshape(rows * cols, 2)  # row-major: patch i is (i % cols, i // cols)
        return ImageFeatures(np.ascontiguousarray(patches, dtype=np.float32), positions,
                             rows * cols // self.pooling_kernel_size**2)


# the settings both processors (images, video frames) read from their section of the processor config
PIXEL_SETTINGS = ("patch_size", "max_soft_tokens", "pooling_kernel_size", "do_resize", "resample", "do_rescale",
                  "rescale_factor", "do_normalize", "image_mean", "image_std")


def settings(section: dict, names: tuple[str, ...], nullable: tuple[str, ...] = ()) -> dict:
    """The processor keyword arguments `section` sets among `names` (a null is "unset", except for `nullable`
    names, where null is a value), the resampling filter and the mean / std triples parsed."""
    kwargs = {k: section[k] for k in names if section.get(k) is not None or (k in section and k in nullable)}
    if "resample" in kwargs:
        kwargs["resample"] = _resample(kwargs["resample"])
    for k in ("image_mean", "image_std"):
        if k in kwargs:
            kwargs[k] = _triple(k, kwargs[k])
    return kwargs


def check_pixel_settings(processor, what: str) -> None:
    """The patch geometry and token budget both processors need, named as `what` in the errors."""
    for name in ("patch_size", "pooling_kernel_size"):
        value = getattr(processor, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{what}: {name}={value!r} must be a positive integer")
    if processor.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(f"{what}: max_soft_tokens={processor.max_soft_tokens!r} must be one of "
                         f"{SUPPORTED_SOFT_TOKENS}")
    if processor.do_normalize and 0.0 in processor.image_std:
        raise ValueError(f"{what}: image_std={processor.image_std} has a zero (division by zero)")


def _resample(value) -> int:
    """A PIL resampling filter from its number (HF saves PIL's enum value) or its name ("bicubic")."""
    try:
        if isinstance(value, str):
            return Image.Resampling[value.upper()].value
        return Image.Resampling(value).value
    except (KeyError, ValueError):
        names = ", ".join(f"{r.value} ({r.name.lower()})" for r in Image.Resampling)
        raise ValueError(f"image processor: resample={value!r} is not a PIL filter; use one of {names}") from None


def _triple(name: str, value) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not (isinstance(values, (list, tuple)) and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ValueError(f"image processor: {name}={value!r} must be a number or a list of 3 numbers")
    return tuple(float(v) for v in values)
