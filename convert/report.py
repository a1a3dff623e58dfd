"""Quality report of a converted (quantized) bundle against its float32 source.

Also, for a bundle with vision/audio towers: how far its towers' soft tokens are from the source's in float32.

Measures what quantization costs where MTP feels it (spec §6.3: acceptance collapses on badly quantized
targets): the mean KL(p_ref || p_quant) and top-1 agreement of the next-token distributions over every
position of a few built-in prompts, and the drafter's greedy acceptance rate with the converted target (and,
when the reference folder has a drafter and its float32 copy is small, with the float32 reference). The result
is printed as a small table and written to `quality_report.json` in the bundle.

Memory: the reference logits are computed first, layer by layer from the source files (convert/reference.py),
and only they are kept; the bundle is loaded after that. The two models are never in memory together, and the
float32 reference never whole (it would be 4 bytes per parameter: 18 GB for E2B).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import deque
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..decode import stream_generate
from ..load import (
    Bundle,
    load,
    load_tokenizer,
    load_towers,
    read_config,
    read_generation_defaults,
    resolve,
    safetensors_files,
    safetensors_header,
)
from ..media.content import MediaItem
from ..media.encoder import MediaEncoder, read_processor_config
from ..models.config import ModelArgs
from ..models.gemma4_text import canonical_key
from ..prompt import Span
from .reference import reference_logits

PROMPTS = (
    "The capital of France is Paris. The capital of Japan is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Speculative decoding lets a small draft model propose tokens that a large model then verifies, so",
    "Once upon a time, in a quiet village by the sea, there lived an old fisherman who",
)
RANDOM_PROMPT_LEN = 24
REPORT_FILE = "quality_report.json"
# the MTP acceptance of the float32 reference needs the whole reference loaded: only up to this size
REFERENCE_IN_MEMORY_BYTES = 2 << 30


def prompt_ids(tokenizer, vocab_size: int) -> list[list[int]]:
    """The built-in prompts through the bundle's tokenizer, or fixed random ids when it has none."""
    if tokenizer is not None:
        return [list(tokenizer.encode(p)) for p in PROMPTS]
    rng = random.Random(0)
    return [[rng.randrange(vocab_size) for _ in range(RANDOM_PROMPT_LEN)] for _ in PROMPTS]


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def next_token_divergence(model, log_p: mx.array, ids: list[int]) -> tuple[mx.array, mx.array]:
    """Per position: KL(p_ref || p_model) in nats, given the reference's log-probs `log_p` (T, V), and whether
    the argmax tokens agree, each (T,)."""
    log_q = _log_softmax(model(mx.array(ids)[None])[0])
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return kl, mx.argmax(log_q, axis=-1) == mx.argmax(log_p, axis=-1)


def acceptance(
    bundle: Bundle, prompts: list[list[int]], max_tokens: int, num_draft_tokens: int
) -> dict | None:
    """Greedy MTP acceptance over the prompts: accepted / drafted draft tokens (None without a drafter)."""
    if bundle.drafter is None or max_tokens < 1:
        return None
    accepted = drafted = 0
    for ids in prompts:
        responses = stream_generate(bundle, ids, max_tokens=max_tokens, num_draft_tokens=num_draft_tokens)
        last = deque(responses, maxlen=1).pop()
        if last.draft is not None:
            accepted, drafted = accepted + last.draft.accepted, drafted + last.draft.drafted
    return {
        "accepted": accepted,
        "drafted": drafted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
    }


def _float32_bytes(path: Path) -> int:
    """Bytes of the checkpoint's text-model tensors in float32 (headers only)."""
    headers = [safetensors_header(file) for file in safetensors_files(path)]
    return sum(4 * math.prod(info["shape"]) for h in headers for name, info in h.items()
               if name != "__metadata__" and canonical_key(name) is not None)


def _reference_acceptance(reference: Path, prompts, max_tokens: int, num_draft_tokens: int) -> dict | None:
    """Acceptance with the float32 reference as target, when it is small enough to load whole (None if not,
    or without a drafter in the reference folder)."""
    if max_tokens < 1 or _float32_bytes(reference) > REFERENCE_IN_MEMORY_BYTES:
        return None
    ref = load(reference, dtype=mx.float32)
    return acceptance(ref, prompts, max_tokens, num_draft_tokens)


def quality_report(
    model: str | Path,
    reference: str | Path,
    max_tokens: int = 32,
    num_draft_tokens: int = 3,
    num_prompts: int = len(PROMPTS),
    prompt_tokens: int | None = None,
) -> dict:
    """Compare a converted bundle with its source weights computed unquantized in float32.

    Args:
        model: the converted bundle (folder or hub id); a local folder receives `quality_report.json`.
        reference: the source checkpoint (e.g. the HF folder the bundle was converted from).
        max_tokens: tokens generated per prompt for the acceptance measurement (0: no acceptance).
        num_draft_tokens: draft length K of the acceptance measurement.
        num_prompts: how many of the built-in prompts to use (at most 4).
        prompt_tokens: cut each prompt to its first this many tokens (default: whole).

    Returns:
        A JSON-ready dict: per-prompt and overall mean KL, max KL, top-1 agreement and MTP acceptance.
    """
    if not 1 <= num_prompts <= len(PROMPTS) or (prompt_tokens is not None and prompt_tokens < 1):
        raise ValueError(f"num_prompts={num_prompts!r} must be in [1, {len(PROMPTS)}] and prompt_tokens="
                         f"{prompt_tokens!r} None or >= 1")
    path, ref_path = resolve(model, "model"), resolve(reference, "reference")
    config = read_config(path)
    vocab = ModelArgs.from_dict(config).vocab_size
    if vocab != ModelArgs.from_dict(read_config(ref_path)).vocab_size:
        raise ValueError(
            f"{model} and {reference} have different vocabularies: not a conversion of each other"
        )
    tokenizer = load_tokenizer(path, read_generation_defaults(path, config).eos_token_ids)
    prompts = [ids[:prompt_tokens] for ids in prompt_ids(tokenizer, vocab)[:num_prompts]]
    log_ps = [_log_softmax(logits) for logits in reference_logits(ref_path, prompts)]  # reference gone after
    mx.eval(log_ps)
    bundle = load(path)
    rows, all_kl, all_agree = [], [], []
    for i, (ids, log_p) in enumerate(zip(prompts, log_ps)):
        kl, agree = next_token_divergence(bundle.target, log_p, ids)
        rows.append(
            {
                "prompt": i,
                "tokens": len(ids),
                "mean_kl": kl.mean().item(),
                "max_kl": kl.max().item(),
                "top1_agreement": agree.astype(mx.float32).mean().item(),
            }
        )
        all_kl.append(kl)
        all_agree.append(agree)
    kl, agree = mx.concatenate(all_kl), mx.concatenate(all_agree)
    report = {
        "model": str(model),
        "reference": str(reference),
        "quantization": bundle.config.get("quantization"),
        "positions": kl.size,
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "top1_agreement": agree.astype(mx.float32).mean().item(),
        "prompts": rows,
        "num_draft_tokens": num_draft_tokens,
        "max_tokens": max_tokens,
        "acceptance": acceptance(bundle, prompts, max_tokens, num_draft_tokens),
    }
    del bundle, log_ps  # the converted model goes before a float32 reference may be loaded
    mx.clear_cache()
    report["reference_acceptance"] = _reference_acceptance(ref_path, prompts, max_tokens, num_draft_tokens)
    report["towers"] = tower_accuracy(path, ref_path)
    if Path(model).expanduser().is_dir():
        (Path(model).expanduser() / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _test_media() -> list[MediaItem]:
    """A deterministic image (a gradient with texture, 320x240) and a 2 s clip (two tones and noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    image = np.stack([x / 320, y / 240, (x + y) / 560], axis=-1) * 200 + rng.integers(0, 55, (240, 320, 3))
    t = np.arange(32000) / 16000
    clip = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t) + 0.02 * rng.standard_normal(t.size)
    return [MediaItem("image", image.astype(np.uint8), "test image"),
            MediaItem("audio", (clip.astype(np.float32), 16000), "test clip")]


def _tower_features(encoder: MediaEncoder) -> dict[str, mx.array]:
    """Each test item's soft tokens through `encoder`'s towers, in float32."""
    out = {}
    for item in _test_media():
        if item.kind == "audio" and not encoder.takes_audio:
            continue
        p = encoder.prepare(item)
        out[item.kind] = encoder.features(Span(p.kind, 0, p.length, p.digest, p.inputs)).astype(mx.float32)
    mx.eval(out)
    return out


def tower_accuracy(path: Path, ref_path: Path) -> dict | None:
    """How far the bundle's towers (in its dtype) are from the source's computed in float32, on a test image and
    clip: the relative L2 error and the cosine similarity of the soft tokens the text model reads. None when the
    bundle has no towers. One set of towers is in memory at a time."""
    config = read_config(path)
    if not isinstance(config.get("vision_config"), dict):
        return None
    hidden = ModelArgs.from_dict(config).hidden_size
    ours = _tower_features(MediaEncoder(config, read_processor_config(path),
                                        lambda: load_towers(path, config, hidden), False))
    ref_config = read_config(ref_path)
    reference = _tower_features(MediaEncoder(ref_config, read_processor_config(ref_path),
                                             lambda: load_towers(ref_path, ref_config, hidden, mx.float32), False))
    result = {}
    for kind, f in ours.items():
        r = reference[kind]
        result[kind] = {
            "soft_tokens": f.shape[0],
            "relative_error": (mx.linalg.norm(f - r) / mx.linalg.norm(r)).item(),
            "cosine": (mx.sum(f * r) / (mx.linalg.norm(f) * mx.linalg.norm(r))).item(),
        }
    return result


def _describe_quantization(q: dict | None) -> str:
    if not q:
        return "not quantized"
    overrides = [v for v in q.values() if isinstance(v, dict)]
    extra = f", {len(overrides)} layers at other precision" if overrides else ""
    return f"{q['bits']}-bit, group {q['group_size']}{extra}"


def format_report(report: dict) -> str:
    """A small text table of `quality_report`'s result."""
    lines = [
        f"quality of {report['model']} vs {report['reference']} (float32): "
        f"{_describe_quantization(report['quantization'])}",
        f"{'prompt':>6} {'tokens':>6} {'mean KL':>10} {'max KL':>10} {'top-1':>7}",
    ]
    for r in report["prompts"]:
        lines.append(
            f"{r['prompt']:>6} {r['tokens']:>6} {r['mean_kl']:>10.5f} {r['max_kl']:>10.5f} "
            f"{r['top1_agreement']:>7.1%}"
        )
    lines.append(
        f"{'all':>6} {report['positions']:>6} {report['mean_kl']:>10.5f} {report['max_kl']:>10.5f} "
        f"{report['top1_agreement']:>7.1%}"
    )
    k = report["num_draft_tokens"]
    for name, key in (("converted", "acceptance"), ("reference", "reference_acceptance")):
        if (a := report.get(key)) is not None:
            lines.append(
                f"MTP greedy acceptance (K={k}), {name} target: {a['accepted']}/{a['drafted']} "
                f"= {a['acceptance_rate']:.1%}"
            )
    for kind, t in (report.get("towers") or {}).items():
        lines.append(f"{kind} tower vs float32: relative error {t['relative_error']:.2e}, cosine "
                     f"{t['cosine']:.6f} ({t['soft_tokens']} soft tokens)")
    return "\n".join(lines)


def run_eval_quant(args: argparse.Namespace) -> None:
    print(format_report(quality_report(args.model, args.reference, args.max_tokens, args.num_draft_tokens,
                                       args.num_prompts, args.prompt_tokens)))


def add_eval_quant_parser(sub) -> None:
    """Register `mlx-gemma-mtp eval-quant`; option names equal `quality_report()`'s arguments."""
    p = sub.add_parser("eval-quant", help="KL / top-1 / MTP acceptance of a converted bundle vs its source")
    p.add_argument("--model", required=True, help="converted bundle folder (receives quality_report.json)")
    p.add_argument(
        "--reference", required=True, help="source checkpoint folder or hub id (computed in float32)"
    )
    p.add_argument("--max-tokens", type=int, default=32,
                   help="tokens per prompt for the acceptance rate (0: skip it)")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="draft length K for the acceptance rate")
    p.add_argument("--num-prompts", type=int, default=len(PROMPTS),
                   help=f"how many built-in prompts (1-{len(PROMPTS)})")
    p.add_argument("--prompt-tokens", type=int, default=None, help="cut each prompt to this many tokens")
    p.set_defaults(func=run_eval_quant)
