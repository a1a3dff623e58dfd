"""Gemma 4's vision and audio towers with their embedders, as one module rooted where the checkpoint puts them.

Released checkpoints hold `model.vision_tower.*`, `model.embed_vision.*` (all sizes) and `model.audio_tower.*`,
`model.embed_audio.*` (E2B/E4B); mlx-vlm / mlx-community conversions drop the leading `model.`. `Towers` mirrors
those names, so its weights load with `load_weights(strict=True)` after `sanitize`. A tower's output, projected by
its embedder, replaces the placeholder tokens' embeddings in the target (`gemma4_text.MediaRows`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import audio, vision
from .embedder import MultimodalEmbedder

ROOTS = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")
_PREFIXES = ("model.", "")


def tower_key(key: str) -> str | None:
    """`vision_tower.…`-style name of a tower or embedder tensor in any supported layout, else None."""
    for prefix in _PREFIXES:
        if key.startswith(prefix) and key[len(prefix):].split(".")[0] in ROOTS:
            return key[len(prefix):]
    return None


class Towers(nn.Module):
    """The towers a checkpoint's config declares (`vision_config`, `audio_config`), with their embedders."""

    def __init__(self, config: dict, text_hidden_size: int):
        super().__init__()
        self.vision_config = self.audio_config = None
        if isinstance(config.get("vision_config"), dict):
            self.vision_config = vision.VisionConfig.from_dict(config["vision_config"])
            self.vision_tower = vision.VisionModel(self.vision_config)
            self.embed_vision = MultimodalEmbedder(self.vision_config.hidden_size, text_hidden_size,
                                                   self.vision_config.rms_norm_eps)
        if isinstance(config.get("audio_config"), dict):
            self.audio_config = audio.AudioConfig.from_dict(config["audio_config"])
            self.audio_tower = audio.AudioModel(self.audio_config)
            out = self.audio_config.output_proj_dims or self.audio_config.hidden_size
            self.embed_audio = MultimodalEmbedder(out, text_hidden_size, self.audio_config.rms_norm_eps)

    def image_features(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """One image's patches (1, P, 3·p²) at (x, y) `position_ids` (1, P, 2) -> its soft tokens (P / k², H)."""
        return self.embed_vision(self.vision_tower(pixel_values, position_ids))

    def audio_features(self, features: mx.array, mask: mx.array, length: int) -> mx.array:
        """One clip's log-mel frames (1, T, n_mels) -> its first `length` soft tokens (length, H): one clip has
        padding only at its end, so the valid soft tokens are the first ones."""
        hidden, _ = self.audio_tower(features, mask)
        return self.embed_audio(hidden[0, :length])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Tower tensors of any layout -> this module's names; other tensors are dropped. Idempotent."""
        parts: dict[str, dict[str, mx.array]] = {root: {} for root in ROOTS}
        for key, value in weights.items():
            if (name := tower_key(key)) is not None:
                root, rest = name.split(".", 1)
                parts[root][rest] = value
        parts["vision_tower"] = vision.sanitize(parts["vision_tower"])
        parts["audio_tower"] = audio.sanitize(parts["audio_tower"])
        return {f"{root}.{k}": v for root, part in parts.items() if root in self for k, v in part.items()}
