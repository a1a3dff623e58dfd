"""A random E2B-shaped MLX pair for tests that need a target and a clustered drafter but no checkpoint."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp.load import Bundle, GenerationDefaults
from mlx_gemma_mtp.models.config import FULL, SLIDING, ModelArgs
from mlx_gemma_mtp.models.gemma4_assistant import Drafter, DrafterArgs
from mlx_gemma_mtp.models.gemma4_text import Model


def random_pair(hidden: int, vocab: int = 8192, layers: int = 10, seed: int = 0) -> Bundle:
    """PLE, KV sharing (the last half), sliding + full layers (window 128), a clustered drafter head (64 x
    vocab/64, top 8) with a random token ordering; MLX's default init, float32."""
    mx.random.seed(seed)
    types = [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(layers)]
    head = max(32, hidden // 8)
    target_args = ModelArgs(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=1, head_dim=head, global_head_dim=2 * head,
        sliding_window=128, layer_types=types, vocab_size_per_layer_input=vocab,
        hidden_size_per_layer_input=32, num_kv_shared_layers=layers // 2, use_double_wide_mlp=True,
    )
    text = ModelArgs(
        vocab_size=vocab, hidden_size=hidden // 4, intermediate_size=hidden, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=head, global_head_dim=2 * head,
        sliding_window=128, layer_types=[SLIDING, SLIDING, SLIDING, FULL], num_kv_shared_layers=4,
        hidden_size_per_layer_input=0, final_logit_softcapping=None,
    )
    target = Model(target_args)
    drafter = Drafter(DrafterArgs(text, hidden, True, num_centroids=64, centroid_intermediate_top_k=8))
    drafter.masked_embedding.token_ordering = mx.random.permutation(vocab).astype(mx.int32)
    mx.eval(target.parameters(), drafter.parameters())
    return Bundle(target, drafter, None, {}, GenerationDefaults(), Path("."))
