"""Per-token model cost, old against new in one run: `python -m mlx_gemma_mtp.bench_forward`.

Times the target forward for T = 1 (a plain decoding step) and T = 5 (the verify of a K = 4 round) at a fixed
context, and the drafter (one compiled step, and a compiled K = 4 greedy round), on the shipped demo pair and
on a random pair with Gemma 4 E2B's widths (hidden 1536, MLP 6144 / 12288 double-wide, head dims 256 / 512,
PLE 256, window 512) but few layers and a small vocabulary. The baseline is the model code at `--baseline` (a
git revision; default: the commit before issue 12) loaded from git as separate modules, with the same weights.
Old and new calls alternate (the order flips every repeat); the minimum and median of `--repeats` calls, each
evaluated with `mx.eval`, are reported. The script raises unless old and new give the same logits, hidden
states and draft tokens (to float32 rounding).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import load
from ..cache import trim_cache
from ..demo import demo_dtype, demo_path
from ..drafting import cache_windows, draft_step
from ..models import gemma4_assistant, gemma4_text
from ..models.config import FULL, SLIDING, ModelArgs
from ..sampling import SamplerConfig

BASELINE = "f1ac8bc"  # the last commit before issue 12 ("leaner rounds") touched the model code
_MODULES = ("gemma4_text", "masked_embedder", "gemma4_assistant")  # in dependency order
ATOL = 1e-4


def baseline_modules(rev: str) -> dict[str, types.ModuleType]:
    """The model modules as of git revision `rev`, imported under private names next to the current ones."""
    root = Path(__file__).resolve().parents[1]
    out = {}
    for name in _MODULES:
        path = f"mlx_gemma_mtp/models/{name}.py"
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True,
                               check=False)
        if shown.returncode:
            raise ValueError(f"cannot read {path} at --baseline {rev!r} from git in {root}: "
                             f"{shown.stderr.strip()}")
        source = shown.stdout
        for dep in out:  # baseline modules import each other, not the current ones
            source = source.replace(f"from .{dep} import", f"from ._baseline_{dep} import")
        module = types.ModuleType(f"mlx_gemma_mtp.models._baseline_{name}")
        module.__package__ = "mlx_gemma_mtp.models"
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # noqa: S102 - our own file, from git
        out[name] = module
    return out


def clone(model, module_class):
    """A model of `module_class` (the baseline's) holding the same weights (and thus the same args)."""
    other = module_class(model.args)
    other.load_weights(tree_flatten(model.parameters()), strict=True)
    mx.eval(other.parameters())
    return other


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
    """One implementation of a pair with its own cache prefilled to `context` tokens, ready to time."""

    def __init__(self, target, drafter, prompt: mx.array):
        self.target, self.drafter = target, drafter
        self.cache = target.make_cache()
        target.forward(prompt[None, :-1], self.cache, rows=0)
        out = target.forward(prompt[None, -1:], self.cache, return_hidden=True)
        mx.eval(out.hidden, [(c.keys, c.values) for c in self.cache])
        self.last, self.hidden = mx.argmax(out.logits[0], axis=-1), out.hidden
        self.step = draft_step(target, drafter)
        self.context = self.step.context(cache_windows(target, self.cache), self.cache[0].offset - 1)

    def forward(self, T: int) -> tuple[mx.array, mx.array]:
        """A T-token target forward (as decode and verify call it), rolled back so the context stays fixed."""
        tokens = mx.concatenate([self.last, mx.arange(T - 1, dtype=self.last.dtype)])[None]
        out = self.target.forward(tokens, self.cache, rows=T, return_hidden=True)
        trim_cache(self.cache, T)
        return out.logits, out.hidden

    def draft_body(self) -> tuple[mx.array, mx.array]:
        return self.step.body(self.last, self.hidden, self.context)

    def draft_round(self) -> mx.array:
        return self.step(self.last, self.hidden, self.context, 4, SamplerConfig())[0]


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


def check_same(label: str, old, new) -> float:
    """Max |old - new| over the outputs; raises above ATOL (integers must match exactly)."""
    old, new = (old if isinstance(old, tuple) else (old,)), (new if isinstance(new, tuple) else (new,))
    worst = 0.0
    for a, b in zip(old, new):
        diff = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
        exact = mx.issubdtype(a.dtype, mx.integer)
        if diff > (0 if exact else ATOL):
            raise AssertionError(f"{label}: old and new differ by {diff}")
        worst = max(worst, diff)
    return worst


def bench_pair(name: str, target, drafter, base: dict, context: int, repeats: int) -> None:
    prompt = mx.random.randint(0, target.args.vocab_size, (context,), dtype=mx.int32)
    new = Subject(target, drafter, prompt)
    old_target = clone(target, base["gemma4_text"].Model)
    old = Subject(old_target, clone(drafter, base["gemma4_assistant"].Drafter), prompt)
    cases = {"target T=1": lambda s: s.forward(1), "target T=5": lambda s: s.forward(5),
             "drafter step": Subject.draft_body, "drafter K=4 round": Subject.draft_round}
    print(f"\n{name}, context {context}: ms per call, min / median of {repeats} (old -> new)")
    for label, call in cases.items():
        diff = check_same(f"{name} {label}", call(old), call(new))
        t = interleaved({"old": partial(call, old), "new": partial(call, new)}, repeats)
        (o_min, o_med), (n_min, n_med) = [(min(t[k]) * 1e3, statistics.median(t[k]) * 1e3) for k in t]
        print(f"  {label:18s} {o_min:8.3f} / {o_med:8.3f} -> {n_min:8.3f} / {n_med:8.3f}   "
              f"min {o_min / n_min:5.2f}x   max|diff| {diff:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old model code")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--e2b-layers", type=int, default=4, help="layers of the E2B-width target (0: skip)")
    args = parser.parse_args(argv)
    base = baseline_modules(args.baseline)
    mx.random.seed(0)
    bundle = load(demo_path(), dtype=demo_dtype())
    bench_pair("demo pair", bundle.target, bundle.drafter, base, args.context, args.repeats)
    if args.e2b_layers:
        target, drafter = e2b_pair(args.e2b_layers)
        # ~30x the demo's cost per call, mostly matmuls: fewer repeats
        bench_pair(f"random E2B widths ({args.e2b_layers} layers, vocab 16384)", target, drafter, base,
                   args.context, max(5, args.repeats // 6))


if __name__ == "__main__":
    main()
