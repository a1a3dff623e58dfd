"""Quality report of a converted (quantized) bundle against its float32 source.

Measures what quantization costs where MTP feels it (spec §6.3: acceptance collapses on badly quantized
targets): the mean KL(p_ref || p_quant) and top-1 agreement of the next-token distributions over every
position of a few built-in prompts, and the drafter's greedy acceptance rate with the converted target (and,
when the reference folder has a drafter, with the float32 reference). The result is printed as a small table
and written to `quality_report.json` in the bundle.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import deque
from pathlib import Path

import mlx.core as mx

from ..decode import stream_generate
from ..load import Bundle, load

PROMPTS = (
    "The capital of France is Paris. The capital of Japan is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Speculative decoding lets a small draft model propose tokens that a large model then verifies, so",
    "Once upon a time, in a quiet village by the sea, there lived an old fisherman who",
)
RANDOM_PROMPT_LEN = 24
REPORT_FILE = "quality_report.json"


def prompt_ids(bundle: Bundle) -> list[list[int]]:
    """The built-in prompts through the bundle's tokenizer, or fixed random ids when it has none."""
    if bundle.tokenizer is not None:
        return [list(bundle.tokenizer.encode(p)) for p in PROMPTS]
    rng = random.Random(0)
    vocab = bundle.target.args.vocab_size
    return [[rng.randrange(vocab) for _ in range(RANDOM_PROMPT_LEN)] for _ in PROMPTS]


def next_token_divergence(model, reference, ids: list[int]) -> tuple[mx.array, mx.array]:
    """Per position: KL(p_ref || p_model) in nats and whether the argmax tokens agree, each (T,)."""
    x = mx.array(ids)[None]
    log_q = model(x)[0].astype(mx.float32)
    log_p = reference(x)[0].astype(mx.float32)
    log_q = log_q - mx.logsumexp(log_q, axis=-1, keepdims=True)
    log_p = log_p - mx.logsumexp(log_p, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return kl, mx.argmax(log_q, axis=-1) == mx.argmax(log_p, axis=-1)


def acceptance(
    bundle: Bundle, prompts: list[list[int]], max_tokens: int, num_draft_tokens: int
) -> dict | None:
    """Greedy MTP acceptance over the prompts: accepted / drafted draft tokens (None without a drafter)."""
    if bundle.drafter is None:
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


def quality_report(
    model: str | Path, reference: str | Path, max_tokens: int = 32, num_draft_tokens: int = 3
) -> dict:
    """Compare a converted bundle with its source weights loaded unquantized in float32.

    Args:
        model: the converted bundle (folder or hub id); a local folder receives `quality_report.json`.
        reference: the source checkpoint (e.g. the HF folder the bundle was converted from).
        max_tokens: tokens generated per prompt for the acceptance measurement.
        num_draft_tokens: draft length K of the acceptance measurement.

    Returns:
        A JSON-ready dict: per-prompt and overall mean KL, max KL, top-1 agreement and MTP acceptance.
    """
    bundle = load(model)
    ref = load(reference, dtype=mx.float32)
    if bundle.target.args.vocab_size != ref.target.args.vocab_size:
        raise ValueError(
            f"{model} and {reference} have different vocabularies: not a conversion of each other"
        )
    prompts = prompt_ids(bundle)
    rows, all_kl, all_agree = [], [], []
    for i, ids in enumerate(prompts):
        kl, agree = next_token_divergence(bundle.target, ref.target, ids)
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
        "reference_acceptance": acceptance(ref, prompts, max_tokens, num_draft_tokens),
    }
    if Path(model).expanduser().is_dir():
        (Path(model).expanduser() / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


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
        if (a := report[key]) is not None:
            lines.append(
                f"MTP greedy acceptance (K={k}), {name} target: {a['accepted']}/{a['drafted']} "
                f"= {a['acceptance_rate']:.1%}"
            )
    return "\n".join(lines)


def run_eval_quant(args: argparse.Namespace) -> None:
    print(format_report(quality_report(args.model, args.reference, args.max_tokens, args.num_draft_tokens)))


def add_eval_quant_parser(sub) -> None:
    """Register `mlx-gemma-mtp eval-quant`; option names equal `quality_report()`'s arguments."""
    p = sub.add_parser("eval-quant", help="KL / top-1 / MTP acceptance of a converted bundle vs its source")
    p.add_argument("--model", required=True, help="converted bundle folder (receives quality_report.json)")
    p.add_argument(
        "--reference", required=True, help="source checkpoint folder or hub id (loaded in float32)"
    )
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt for the acceptance rate")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="draft length K for the acceptance rate")
    p.set_defaults(func=run_eval_quant)
