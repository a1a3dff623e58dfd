"""mlx-vlm's side of the image benchmark (`bench.multimodal`): why its image + MTP path cannot run here, and
the pair loaded by mlx-vlm with its vision tower, timed one request at a time the way ours is. Apart from
`bench/mlx_vlm.py` (the text path, whose export this extends with the tower and the image token ids) so that
each benchmark module stays small; `Run` is here so that both sides record a request alike without an import
cycle.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..load import Bundle
from ..stats import DraftStats


@dataclass
class Run:
    """One request: seconds to the first token, tokens/s after it, the tokens, MTP counters (None: plain)."""

    ttft: float
    tps: float
    tokens: list[int]
    stats: DraftStats | None = None


def mlx_vlm_blocker(bundle: Bundle) -> str | None:
    """Why mlx-vlm's image + MTP path cannot run on this pair in this environment (naming the module or
    dependency that is missing), or None."""
    from . import mlx_vlm

    if (version := mlx_vlm.version()) is None:
        return "mlx-vlm is not installed (pip install --no-deps mlx-vlm requests Pillow)"
    if why := mlx_vlm.unsupported(bundle):
        return f"mlx-vlm {version}: {why}"
    if any(hasattr(m, "scales") for _, m in bundle.media.towers.named_modules()):
        return f"mlx-vlm {version}: quantized towers are not exported (compare a float bundle)"
    modules = ("mlx_vlm.utils", "mlx_vlm.generate", "mlx_vlm.speculative",
               "mlx_vlm.models.gemma4.processing_gemma4", "mlx_vlm.models.gemma4")
    for name in modules:
        try:
            __import__(name)
        except ImportError as e:
            missing = f" (missing module {e.name!r})" if getattr(e, "name", None) else ""
            return f"mlx-vlm {version}: importing {name} failed: {e}{missing}"
    return None


class MlxVlmImagePair:
    """The bundle's target (text model and vision tower) and drafter loaded by mlx-vlm, for drafts of up to
    `max_k` tokens; `run` times one request the way `bench.multimodal.our_run` does."""

    def __init__(self, bundle: Bundle, max_k: int):
        from mlx.utils import tree_flatten

        from .mlx_vlm import export_pair, load_exported

        self.bundle, self.image_token = bundle, bundle.media.tokens.image
        with tempfile.TemporaryDirectory(prefix="mlx_vlm_image_pair_") as tmp:
            target_dir, drafter_dir = export_pair(bundle, Path(tmp), max_k)
            config = json.loads((target_dir / "config.json").read_text())
            config["vision_config"] = bundle.config["vision_config"]  # the real tower instead of an empty one
            config.update({k: v for k, v in bundle.config.items() if k.endswith(("_token_id", "_token_index"))})
            (target_dir / "config.json").write_text(json.dumps(config))
            towers = {k: v for k, v in tree_flatten(bundle.media.towers.parameters())
                      if k.startswith(("vision_tower.", "embed_vision."))}  # no audio: the config has none
            mx.save_safetensors(str(target_dir / "towers.safetensors"), towers)
            self.model, self.drafter = load_exported(target_dir, drafter_dir)
        self.real_draft_block = self.drafter.draft_block
        self.last_ids: list[int] = []  # the prompt ids of the last run

    def processor(self, budget: int):
        from mlx_vlm.models.gemma4.processing_gemma4 import Gemma4ImageProcessor

        ours = self.bundle.media.image_processor
        return Gemma4ImageProcessor(patch_size=ours.patch_size, pooling_kernel_size=ours.pooling_kernel_size,
                                    max_soft_tokens=budget)

    def prompt_ids(self, encoded, count: int) -> list[int]:
        """Our prompt ids with the image's soft tokens as many as mlx-vlm's processor makes."""
        span = encoded.spans[0]
        return encoded.ids[: span.start] + [self.image_token] * count + encoded.ids[span.end:]

    def force(self, reference: list[int] | None, rate: float | None, seed: int = 0) -> None:
        """Make its drafter's drafts the reference tokens with probability `rate` (as `forced_proposer`), or
        restore the real drafter (None)."""
        if reference is None or rate is None:
            self.drafter.draft_block = self.real_draft_block
            return
        key, real, drafter = [mx.random.key(seed)], self.real_draft_block, self.drafter

        def draft_block(last_bonus, hidden, cache, block_size, sampler, token_dtype=mx.int32, **kwargs):
            tokens = real(last_bonus, hidden, cache, block_size, sampler, token_dtype, **kwargs)
            k, at = block_size - 1, drafter._kv_offset  # the bonus token's position: drafts follow it
            ref = mx.array([(reference + [0] * (k + 1))[at + 1 : at + 1 + k]], dtype=tokens.dtype)
            key[0], sub = mx.random.split(key[0])
            return mx.where(mx.random.uniform(shape=tokens.shape, key=sub) < rate, ref, tokens)

        drafter.draft_block = draft_block

    def run(self, image: bytes, encoded, budget: int, max_tokens: int, k: int) -> Run:
        """One greedy request: the image decoded and processed by its processor, then its `generate_step`
        (plain for k = 0, else its MTP path drafting k tokens a round)."""
        from mlx_vlm.generate import generate_step
        from PIL import Image

        tic = time.perf_counter()
        with Image.open(io.BytesIO(image)) as im:
            pil = im.convert("RGB")
        data, counts = self.processor(budget).preprocess([pil])
        self.last_count = counts[0]
        ids = self.last_ids = self.prompt_ids(encoded, counts[0])
        types = (mx.array([ids]) == self.image_token).astype(mx.int32)
        draft = {"draft_model": self.drafter, "draft_kind": "mtp", "draft_block_size": k + 1} if k else {}
        if k:
            self.drafter.config.block_size = k + 1  # the per-round cap (bench/mlx_vlm.py)
        steps = generate_step(mx.array([ids], dtype=mx.int32), self.model, mx.array(data["pixel_values"]), None,
                              max_tokens=max_tokens, temperature=0.0, mm_token_type_ids=types, **draft)
        tokens, ttft, first = [], None, None
        for token, _ in steps:
            tokens.append(int(token.item() if isinstance(token, mx.array) else token))
            if ttft is None:
                first = time.perf_counter()
                ttft = first - tic
            if len(tokens) >= max_tokens:
                break
        steps.close()
        after = time.perf_counter() - first
        stats = None
        if k:
            stats = DraftStats()
            for drafted, accepted in zip(self.drafter.draft_lens, self.drafter.accept_lens):
                stats.record(drafted, accepted)
        return Run(ttft, len(tokens) / after if after > 0 else float("nan"), tokens, stats)
