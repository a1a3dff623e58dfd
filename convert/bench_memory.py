"""Peak memory of a streamed, quantized conversion: `python -m mlx_gemma_mtp.convert.bench_memory`.

Writes a synthetic multi-shard bf16 Gemma 4 checkpoint (random weights, realistic per-layer shapes: released
attention geometry, a wide MLP) into a temporary folder, converts it (`quantize=True`) in a subprocess and
prints that subprocess's peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`) next to the largest source shard
and the RSS of subprocesses that only import mlx and the converter. The streaming converter should need about
one output shard plus one tensor on top of the import baseline, not the whole model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models.config import ModelArgs
from ..models.gemma4_text import Model

# Runs the measured programs one after another and prints RUSAGE_CHILDREN after each (a running maximum, so
# they go from smallest to largest). It imports nothing heavy: on Linux a child inherits its parent's peak RSS
# across fork/exec, so the measuring parent must stay small.
_DRIVER = r"""
import json, resource, subprocess, sys, time
unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
result = {}
for name, code in json.loads(sys.argv[1]):
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    result[name] = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit, time.perf_counter() - tic)
print(json.dumps(result))
"""


def synthetic_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    """A `gemma4_text` config with the released models' attention geometry (spec §7.1) at a chosen size."""
    return {
        "model_type": "gemma4_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "global_head_dim": 512,
        "sliding_window": 512,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": vocab,
        "num_kv_shared_layers": 0,
        "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }


def write_checkpoint(path: Path, config: dict, shard_bytes: int) -> list[int]:
    """Random bf16 weights in HF text-model names, sharded like `save_pretrained`; returns the shard sizes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    model = Model(ModelArgs.from_dict(config))  # lazy: only names and shapes are used
    shards, pending, size = [], {}, 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        mx.save_safetensors(str(path / name), pending)
        shards.append((name, list(pending)))

    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1 or leaf == "layer_scalar":
            w = mx.ones(p.shape, mx.bfloat16)
        else:
            w = (mx.random.normal(p.shape, key=mx.random.key(i)) * p.shape[-1] ** -0.5).astype(mx.bfloat16)
        mx.eval(w)
        if pending and size + w.nbytes > shard_bytes:
            flush()
            pending, size = {}, 0
            mx.clear_cache()
        pending[name], size = w, size + w.nbytes
    flush()
    weight_map = {}
    for i, (name, keys) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (path / name).rename(path / final)
        weight_map.update(dict.fromkeys(keys, final))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return [(path / f).stat().st_size for f in sorted(set(weight_map.values()))]


def measure(programs: list[tuple[str, str]]) -> dict[str, tuple[int, float]]:
    """{name: (peak RSS in bytes so far, seconds)} for Python programs run in turn under a small parent."""
    r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(programs)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"benchmark subprocess failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.convert.bench_memory", description=__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--shard-mb", type=float, default=100.0, help="source shard size (MB)")
    p.add_argument(
        "--out-shard-mb", type=float, default=None, help="output shard cap (MB; default: --shard-mb)"
    )
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed afterwards)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        config = synthetic_config(args.layers, args.hidden, args.intermediate, args.vocab)
        sizes = write_checkpoint(src, config, int(args.shard_mb * 1e6))
        out_cap = int((args.out_shard_mb or args.shard_mb) * 1e6)
        code = (
            f"from mlx_gemma_mtp.convert import convert; convert({str(src)!r}, {str(out)!r}, quantize=True, "
            f"q_bits={args.q_bits}, max_shard_size={out_cap})"
        )
        rss = measure(
            [
                ("mlx", "import mlx.core as mx; mx.eval(mx.zeros(1))"),
                ("import", "import mlx_gemma_mtp.convert"),
                ("convert", code),
            ]
        )
        (mlx_rss, _), (import_rss, _), (peak, seconds) = rss["mlx"], rss["import"], rss["convert"]
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))

    mb = 1e6
    largest = max(sizes)
    print(
        f"source: {sum(sizes) / mb:.0f} MB bf16 in {len(sizes)} shards (largest {largest / mb:.1f} MB); "
        f"output: {written / mb:.0f} MB ({args.q_bits}-bit mixed, shard cap {out_cap / mb:.0f} MB) "
        f"in {seconds:.1f} s"
    )
    print(
        f"baseline RSS: import mlx {mlx_rss / mb:.0f} MB, "
        f"import mlx_gemma_mtp.convert {import_rss / mb:.0f} MB"
    )
    print(f"conversion peak RSS: {peak / mb:.0f} MB")
    print(
        f"peak / largest shard: {peak / largest:.2f}x; (peak - import baseline) / largest shard: "
        f"{(peak - import_rss) / largest:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
