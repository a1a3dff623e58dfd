"""A multimodal target as the converter writes it: the text model (`model.*`) and the vision/audio towers with
their embedders (`vision_tower.*`, `embed_vision.*`, `audio_tower.*`, `embed_audio.*`: mlx-vlm's names, which
`load` reads back) in one set of shards. The towers stay in the output's float dtype, never quantized: they run
once per image or clip, not per token, so quantizing them saves little time and their memory is loaded only when
a prompt holds media."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..models.gemma4_text import Model, canonical_key
from ..models.towers import ROOTS, Towers, tower_key


class TargetWithTowers(nn.Module):
    def __init__(self, model: Model, towers: Towers):
        super().__init__()
        self.args = model.args
        self.model = model.model
        for root in ROOTS:
            if root in towers:
                setattr(self, root, towers[root])
        # plain attributes (functions, not modules): the parameter tree is the text model's plus the towers'
        object.__setattr__(self, "_sanitize_text", model.sanitize)
        object.__setattr__(self, "_sanitize_towers", towers.sanitize)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        text = {k: v for k, v in weights.items() if canonical_key(k) is not None}
        towers = {k: v for k, v in weights.items() if tower_key(k) is not None}
        return {**self._sanitize_text(text), **self._sanitize_towers(towers)}


def keeps(key: str) -> bool:
    """The tensors a multimodal conversion reads: the text model's and the towers' (not the tied lm_head)."""
    return canonical_key(key) is not None or tower_key(key) is not None
