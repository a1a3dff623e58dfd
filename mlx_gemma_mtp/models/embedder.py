"""Gemma 4's multimodal embedder (`model.embed_vision`, `model.embed_audio`): a tower's output soft tokens into
the text model's embedding space (reference: transformers `Gemma4MultimodalEmbedder`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .gemma4_text import RMSNorm


class MultimodalEmbedder(nn.Module):
    """Scale-free RMSNorm then a bias-free projection to the text hidden size. The features it returns replace
    the placeholder tokens' embeddings as they are: no sqrt(hidden) scale, unlike a token embedding."""

    def __init__(self, multimodal_hidden_size: int, text_hidden_size: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(multimodal_hidden_size, eps, with_scale=False)
        self.embedding_projection = nn.Linear(multimodal_hidden_size, text_hidden_size, bias=False)

    def __call__(self, soft_tokens: mx.array) -> mx.array:  # (..., multimodal_hidden) -> (..., text_hidden)
        return self.embedding_projection(self.embedding_pre_projection_norm(soft_tokens))
