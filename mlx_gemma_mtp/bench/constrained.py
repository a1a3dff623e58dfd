"""Structured output's cost, side by side in one run: `python -m mlx_gemma_mtp.bench.constrained`.

1. The grammar's cost per token at Gemma 4's vocabulary (V = 262,144, a Gemma-4-like tokenizer): the next-token
   mask (llguidance's bitmask, unpacked on the device) and a K = 8 round's verify masks (the matcher walks the
   drafts and rolls back), in microseconds, median of `--repeats`.
2. The demo pair, greedy, free text vs under a JSON schema: plain decoding and MTP per K, tokens/s and speedup over
   plain under the same setting; under the schema every MTP row must give plain decoding's tokens (it raises if
   not). A constrained round reads its drafts once (a second host sync per round), never once per draft token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from .. import load, stream_generate
from ..constraint import Constraint, grammar_tokenizer
from .sampling import median_ms

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "size", "tags"]}
VOCAB = 262144


def mask_costs(repeats: int) -> dict[str, float]:
    """Microseconds per next-token mask and per K = 8 verify masks at V = 262,144."""
    from ..testing.tokenizer import write_gemma4_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_gemma4_tokenizer(Path(folder), VOCAB, "{{ bos_token }}")
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        tokenizer = load_tokenizer(Path(folder))
    tic = time.perf_counter()
    ll = grammar_tokenizer(tokenizer, VOCAB, [1, 106])
    setup = time.perf_counter() - tic
    constraint = Constraint.json(ll, SCHEMA, VOCAB, [1, 106])
    prefix = tokenizer.encode('{"name": "a', add_special_tokens=False)
    constraint.consume(prefix)
    drafts = tokenizer.encode("bc\", \"size\": 1", add_special_tokens=False)[:8]
    return {
        "tokenizer conversion (once per loaded model, s)": setup,
        "next-token mask (us)": 1e3 * median_ms(lambda: constraint.restrict(mx.zeros((1, VOCAB))), repeats),
        f"verify masks, K = {len(drafts)} drafts (us)": 1e3 * median_ms(lambda: constraint.masks_along(drafts)[0],
                                                                         repeats),
    }


def decode_rows(bundle, prompt: str, max_tokens: int, ks: list, schema: dict | None) -> list[tuple]:
    """(K, tokens/s, mean accepted per round, tokens) per mode, plain first; MTP rows checked against plain."""
    rows = []
    for k in [0, *ks]:
        for _ in range(2):  # the first run compiles: keep the second
            responses = list(stream_generate(bundle, prompt, max_tokens, num_draft_tokens=k, json_schema=schema))
        last = responses[-1]
        tokens = [r.token for r in responses]
        if rows and tokens != rows[0][3]:
            raise RuntimeError(f"K={k} under {'the schema' if schema else 'free text'} changed the greedy output")
        rows.append((k, last.generation_tps, last.draft.mean_accepted_length if last.draft else 0.0, tokens))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4], help="draft lengths (plus auto)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    print("grammar cost at V = 262,144 (llguidance", _version(), "):")
    for name, value in mask_costs(args.repeats).items():
        print(f"  {name}: {value:.3g}")
    from ..demo import demo_dtype, demo_path

    bundle = load(demo_path(), dtype=demo_dtype())
    prompt = "# the package's metadata as JSON\nMETADATA = "
    print(f"\ndemo pair, greedy, {args.max_tokens} tokens; schema: {SCHEMA}")
    print("setting      mode    tok/s   vs plain  mean accepted")
    for label, schema in (("free text", None), ("JSON schema", SCHEMA)):
        rows = decode_rows(bundle, prompt, args.max_tokens, [*args.k, "auto"], schema)
        for k, tps, accepted, _ in rows:
            mode = "plain" if k == 0 else f"K={k}"
            print(f"{label:12} {mode:6} {tps:7.1f}  {tps / rows[0][1]:7.2f}x  {accepted:13.2f}")


def _version() -> str:
    from importlib.metadata import version

    return version("llguidance")


if __name__ == "__main__":
    main()
