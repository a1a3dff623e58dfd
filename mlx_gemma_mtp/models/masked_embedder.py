"""Clustered ("masked") LM head of the E2B/E4B MTP drafters.

Reference: transformers `models/gemma4_assistant/modeling_gemma4_assistant.py: Gemma4AssistantMaskedEmbedder`;
spec §4.4. The vocabulary is split into `num_centroids` clusters of `V / num_centroids` tokens
(`token_ordering[c*n:(c+1)*n]` are the canonical ids of cluster c). A step scores the centroids, keeps the top-k
clusters and computes logits only for their tokens, gathering just those rows of the (possibly quantized) LM head.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class MaskedEmbedder(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, num_centroids: int, top_k: int):
        super().__init__()
        if vocab_size % num_centroids:
            raise ValueError(f"vocab_size {vocab_size} is not a multiple of num_centroids {num_centroids}")
        self.top_k = top_k
        self.centroids = nn.Linear(hidden_size, num_centroids, bias=False)
        # integer buffer: bf16 would corrupt ids above 256 (pitfall 25)
        self.token_ordering = mx.zeros((vocab_size,), dtype=mx.int32)

    def candidates(self, y: mx.array, lm_head: nn.Module) -> tuple[mx.array, mx.array]:
        """Candidate ids (B, T, top_k*n) int32 and their logits (B, T, top_k*n) for hidden `y` (B, T, Hd).

        `lm_head` is the drafter's tied embedding; calling it gathers (and dequantizes) only candidate rows.
        """
        clusters = mx.argpartition(-self.centroids(y), self.top_k - 1, axis=-1)[..., : self.top_k]
        n_clusters = self.centroids.weight.shape[0]
        ids = self.token_ordering.reshape(n_clusters, -1)[clusters].reshape(*y.shape[:-1], -1)
        rows = lm_head(ids)  # (B, T, N, Hd)
        logits = (rows @ y[..., None]).squeeze(-1)
        return ids, logits

    def argmax(self, y: mx.array, lm_head: nn.Module) -> mx.array:
        """Greedy fast path: the top candidate's id (B, T), without a vocabulary-wide tensor."""
        ids, logits = self.candidates(y, lm_head)
        return mx.take_along_axis(ids, mx.argmax(logits, axis=-1, keepdims=True), axis=-1).squeeze(-1)

    def full_logits(self, y: mx.array, lm_head: nn.Module, vocab_size: int) -> mx.array:
        """HF's vocabulary-wide output: candidates scattered over a fill of min(candidate logits) - 1.

        The fill is one scalar over the whole call, as in HF. Only parity tests need this.
        """
        ids, logits = self.candidates(y, lm_head)
        fill = logits.min() - 1.0
        out = mx.broadcast_to(fill, (*ids.shape[:-1], vocab_size)).astype(logits.dtype)
        return mx.put_along_axis(out, ids, logits, axis=-1)
