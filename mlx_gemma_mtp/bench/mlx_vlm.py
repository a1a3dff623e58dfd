"""The same pair through mlx-vlm's Gemma 4 MTP path, for `bench`'s side-by-side table (only if mlx-vlm is
installed: `pip install --no-deps mlx-vlm requests Pillow` is enough for its text path).

mlx-vlm cannot read our folders as they are, so the pair is exported to a temporary folder in its layout:
- target: only mlx-vlm's multimodal `gemma4` class has the MTP hooks (its `gemma4_text` has none), so the config
  becomes `{"model_type": "gemma4", "text_config": ..., "vision_config": {}}` (an empty vision config is built
  and then dropped, as the checkpoint has no vision weights) and the weights are renamed `model.*` ->
  `language_model.model.*` (its sanitize strips a bare leading `model.`);
- drafter: our weights and config unchanged, plus `block_size`: mlx-vlm drafts at most `block_size - 1` tokens per
  round (default 3) until its recent acceptance reaches 65%, so each run sets it to K + 1.
Prompts go in as token ids (no chat template, no BOS added). mlx-vlm's `generate_step` ignores EOS, so outputs
are compared over the tokens our plain decoding produced. mlx-vlm queries the drafter at the hidden state's own
position (our `position_offset=0`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..load import Bundle
from ..stats import DraftStats
from ..tuner.drafter_init import drafter_config


def version() -> str | None:
    """mlx-vlm's version, or None when it is not installed."""
    if importlib.util.find_spec("mlx_vlm") is None:
        return None
    return importlib.metadata.version("mlx-vlm")


def unsupported(bundle: Bundle) -> str | None:
    """Why this pair cannot be exported to mlx-vlm, or None."""
    if any(name.endswith(".scales") for name, _ in tree_flatten(bundle.target.parameters())):
        return "quantized targets are not exported (compare a float bundle)"
    return None


def export_pair(bundle: Bundle, folder: Path, k: int) -> tuple[Path, Path]:
    """Write the bundle's target and drafter into `folder` in mlx-vlm's layout; returns their folders."""
    target_dir, drafter_dir = folder / "target", folder / "drafter"
    target_dir.mkdir(parents=True)
    drafter_dir.mkdir(parents=True)
    text = bundle.target.args.to_dict()
    eos = bundle.generation.eos_token_ids
    config = {
        "model_type": "gemma4", "text_config": text, "vision_config": {}, "audio_config": None,
        "vocab_size": text["vocab_size"], "hidden_size": text["hidden_size"], "tie_word_embeddings": True,
        "eos_token_id": list(eos) if eos else None,
    }
    (target_dir / "config.json").write_text(json.dumps(config))
    weights = {"language_model." + name: w for name, w in tree_flatten(bundle.target.parameters())}
    mx.save_safetensors(str(target_dir / "model.safetensors"), weights)
    drafter = bundle.drafter
    dtype = drafter.pre_projection.weight.dtype
    (drafter_dir / "config.json").write_text(json.dumps({**drafter_config(drafter.args, dtype), "block_size": k + 1}))
    mx.save_safetensors(str(drafter_dir / "model.safetensors"), dict(tree_flatten(drafter.parameters())))
    return target_dir, drafter_dir


def _generate(model, drafter, prompt: list[int], max_tokens: int, k: int) -> tuple[list[int], float]:
    """(tokens, seconds after the first token): our `generation_tps` convention."""
    from mlx_vlm.generate import generate_step

    tokens, first = [], None
    steps = generate_step(mx.array([prompt], dtype=mx.int32), model, None, None, max_tokens=max_tokens,
                          temperature=0.0, draft_model=drafter, draft_kind="mtp", draft_block_size=k + 1)
    for token, _ in steps:
        tokens.append(int(token.item() if isinstance(token, mx.array) else token))
        first = first or time.perf_counter()
        if len(tokens) >= max_tokens:
            break
    return tokens, time.perf_counter() - first


def load_exported(target_dir: Path, drafter_dir: Path) -> tuple:
    """(model, drafter) loaded by mlx-vlm from an export, its arrays read before the folder goes."""
    from mlx_vlm.speculative import load_drafter
    from mlx_vlm.utils import load_model

    logging.disable(logging.WARNING)  # it warns that an absent vision tower is dropped: expected here
    try:
        model = load_model(target_dir)
        drafter, _ = load_drafter(str(drafter_dir), kind="mtp")
    finally:
        logging.disable(logging.NOTSET)
    mx.eval(model.parameters(), drafter.parameters())
    return model, drafter


class MlxVlmPair:
    """The bundle's pair loaded by mlx-vlm (exported once, for drafts of up to `max_k` tokens)."""

    def __init__(self, bundle: Bundle, max_k: int):
        with tempfile.TemporaryDirectory(prefix="mlx_vlm_pair_") as tmp:
            self.model, self.drafter = load_exported(*export_pair(bundle, Path(tmp), max_k))
        _generate(self.model, self.drafter, [1, 2, 3], 8, max_k)  # warm-up

    def run(self, prompts: list[list[int]], max_tokens: int, k: int) -> tuple[float, DraftStats, list[list[int]]]:
        """Greedy MTP decoding of each prompt with K drafts per round: (tokens/s, its counters, outputs)."""
        self.drafter.config.block_size = k + 1  # the per-round cap (see the module docstring)
        outputs, seconds, stats = [], 0.0, DraftStats()
        for prompt in prompts:
            tokens, s = _generate(self.model, self.drafter, prompt, max_tokens, k)
            outputs.append(tokens)
            seconds += s
            for drafted, accepted in zip(self.drafter.draft_lens, self.drafter.accept_lens):
                stats.record(drafted, accepted)
        return sum(map(len, outputs)) / seconds, stats, outputs
