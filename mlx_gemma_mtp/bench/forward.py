"""Model cost per call, by row count and draft length: `python -m mlx_gemma_mtp.bench.forward`.

Times the current model code only: the target forward of T = 1..9 rows at a fixed context (T = 1 is a plain
decoding step, T = K + 1 the verify of K drafts), one compiled drafter step, and the compiled drafter round of
K = 1..8 greedy drafts, on the shipped demo pair and on a random pair with Gemma 4 E2B's widths (hidden 1536,
MLP 6144 / 12288 double-wide, head dims 256 / 512, PLE 256, window 512) but few layers and a small vocabulary.
Each pair gets one table: T_verify(T) and T_draft(K) (min / median of `--repeats` calls, each evaluated with
`mx.eval`), and side by side T_verify(T)/T_verify(1) (how much a wider verify costs over a plain step) and
T_draft(K)/K (the per-draft cost a round pays), both from the minima: other processes only ever add time. All
calls of a repeat alternate (the order flips every repeat), as drafts and verifies alternate in a round and
evict each other's weights from the CPU caches. `bench` measures the same costs around its decoding runs; this
script isolates them, with more repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import mlx.core as mx

from .. import load
from ..cache import trim_cache
from ..demo import demo_dtype, demo_path
from ..drafting import DraftStep, cache_windows
from ..models import gemma4_assistant, gemma4_text
from ..models.config import FULL, SLIDING, ModelArgs
from ..sampling import SamplerConfig

MAX_T = 9  # verify rows up to K + 1 with K = 8, the longest round the engine drafts


def e2b_pair(layers: int = 4, vocab: int = 16384, seed: int = 0):
    """Random target with E2B's widths (sliding/full alternating, last half KV-shared), E2B-style drafter."""
    mx.random.seed(seed)
    types_ = [FULL if i % 2 else SLIDING for i in range(layers)]
    rope = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
    common = {"vocab_size": vocab, "num_key_value_heads": 1, "head_dim": 256, "global_head_dim": 512,
              "sliding_window": 512, "rope_parameters": rope}
    target_args = ModelArgs(
        hidden_size=1536, intermediate_size=6144, num_hidden_layers=layers, num_attention_heads=8,
        layer_types=types_, vocab_size_per_layer_input=vocab, hidden_size_per_layer_input=256,
        num_kv_shared_layers=layers // 2, use_double_wide_mlp=True, **common,
    )
    text = ModelArgs(
        hidden_size=256, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
        layer_types=[SLIDING] * 3 + [FULL], num_kv_shared_layers=4, hidden_size_per_layer_input=0,
        final_logit_softcapping=None, **common,
    )
    target = gemma4_text.Model(target_args)
    drafter = gemma4_assistant.Drafter(gemma4_assistant.DrafterArgs(text, 1536, True, 2048, 32))
    drafter.masked_embedding.token_ordering = mx.random.permutation(vocab).astype(mx.int32)
    mx.eval(target.parameters(), drafter.parameters())
    return target, drafter


class Subject:
    """A pair with its own cache prefilled to `context` tokens, ready to time; no call changes the cache."""

    def __init__(self, target, drafter, prompt: mx.array):
        self.target = target
        self.cache = target.make_cache(max_rollback=MAX_T)
        target.forward(prompt[None, :-1], self.cache, rows=0)
        out = target.forward(prompt[None, -1:], self.cache, return_hidden=True)
        mx.eval(out.hidden, [(c.keys, c.values) for c in self.cache])
        self.last, self.hidden = mx.argmax(out.logits[0], axis=-1), out.hidden
        self.step = DraftStep(target, drafter)
        self.context = self.step.context(cache_windows(target, self.cache), self.cache[0].offset - 1)

    def forward(self, T: int) -> tuple[mx.array, mx.array]:
        """A T-token target forward (as decode and verify call it), rolled back so the context stays fixed."""
        tokens = mx.concatenate([self.last, mx.arange(T - 1, dtype=self.last.dtype)])[None]
        out = self.target.forward(tokens, self.cache, rows=T, return_hidden=True)
        trim_cache(self.cache, T)
        return out.logits, out.hidden

    def draft_body(self) -> tuple[mx.array, mx.array]:
        """One compiled drafter step: (next hidden, y)."""
        return self.step.body(self.last, self.hidden, self.context)

    def draft_round(self, k: int) -> mx.array:
        """A compiled greedy round of `k` drafts, as the decoding loop runs it (one call)."""
        return self.step(self.last, self.hidden, self.context, k, SamplerConfig())[0]


def interleaved(fns: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    """Seconds per evaluated call of each function, calls alternating (order reversed every repeat)."""
    times = {name: [] for name in fns}
    names = list(fns)
    for name in names:  # warm up: compile, allocate
        mx.eval(fns[name]())
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            mx.eval(fns[name]())
            times[name].append(time.perf_counter() - start)
    return times


def cases(subject: Subject) -> dict[str, Callable]:
    """Every timed call: the verify of T rows for T = 1..MAX_T, one drafter step, a round of K drafts."""
    fns = {f"T={t}": (lambda t=t: subject.forward(t)) for t in range(1, MAX_T + 1)}
    fns["step"] = subject.draft_body
    fns |= {f"K={k}": (lambda k=k: subject.draft_round(k)) for k in range(1, MAX_T)}
    return fns


def table(times: dict[str, list[float]]) -> list[str]:
    """One line per T = K + 1: T_verify(T) min / median and its ratio to T = 1, T_draft(K) min / median and
    per draft."""
    ms = {name: (min(t) * 1e3, statistics.median(t) * 1e3) for name, t in times.items()}
    v1 = ms["T=1"][0]
    head = (f"{'T':>3} {'T_verify(T) ms':>19} {'T_v(T)/T_v(1)':>14}   {'K':>2} {'T_draft(K) ms':>19} "
            f"{'T_draft(K)/K ms':>16}")
    lines = [head]
    for t in range(1, MAX_T + 1):
        (v_min, v_med), k = ms[f"T={t}"], t - 1
        line = f"{t:>3} {v_min:8.3f} / {v_med:8.3f} {v_min / v1:14.2f}   {k:>2}"
        if k:
            d_min, d_med = ms[f"K={k}"]
            line += f" {d_min:8.3f} / {d_med:8.3f} {d_min / k:16.3f}"
        lines.append(line.rstrip())
    s_min, s_med = ms["step"]
    lines.append(f"drafter step (one compiled step): {s_min:.3f} / {s_med:.3f} ms")
    return lines


def bench_pair(name: str, target, drafter, context: int, repeats: int) -> None:
    """Time and print one pair's table at a `context`-token prefix."""
    prompt = mx.random.randint(0, target.args.vocab_size, (context,), dtype=mx.int32)
    subject = Subject(target, drafter, prompt)
    times = interleaved(cases(subject), repeats)
    print(f"\n{name}, context {context}: ms per call, min / median of {repeats}; ratios from the minima")
    for line in table(times):
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench.forward",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=256, help="tokens in the cache before each timed call")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--e2b-layers", type=int, default=4, help="layers of the E2B-width target (0: skip)")
    args = parser.parse_args(argv)
    if args.context < 2 or args.repeats < 1:
        parser.error(f"--context {args.context} / --repeats {args.repeats}: need a context of at least 2 "
                     "tokens and at least 1 repeat")
    if args.e2b_layers and args.e2b_layers < 4:
        parser.error(f"--e2b-layers {args.e2b_layers}: the KV-shared half needs a producer of each layer "
                     "type; pass 0 (skip the pair) or at least 4")
    mx.random.seed(0)
    bundle = load(demo_path(), dtype=demo_dtype())
    bench_pair("demo pair", bundle.target, bundle.drafter, args.context, args.repeats)
    if args.e2b_layers:
        target, drafter = e2b_pair(args.e2b_layers)
        # ~30x the demo's cost per call, mostly matmuls: fewer repeats
        bench_pair(f"random E2B widths ({args.e2b_layers} layers, vocab 16384)", target, drafter,
                   args.context, max(1, args.repeats // 6))


if __name__ == "__main__":
    main()
