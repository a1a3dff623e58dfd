"""HF Gemma 4 checkpoint (+ MTP drafter) -> one MLX bundle folder, streamed tensor by tensor.

Reference: mlx-lm `convert.py` / `utils.py: save_model, quantize_model` (sharded safetensors with an index,
`config["quantization"]` with per-path overrides); spec §6. Keys go through the loader's own `sanitize`
(`Model.sanitize`, `Drafter.sanitize`), so the bundle holds exactly the names `load` expects. Tensors are read
lazily one at a time, cast/quantized with `mx.quantize` and appended to output shards capped at
`max_shard_size` (convert/shards.py), each shard file written once: peak memory is about one tensor plus its
output, never a whole shard or model, and a tensor over SLICE_BYTES (E2B's 4.7 GB per-layer embedding table)
is read, quantized and written in row slices. Vision/audio towers are kept, in the output's float dtype
(convert/towers.py), unless `text_only`. Everything is written to a
temporary folder next to the output and renamed into place only on success; an error, Ctrl-C or SIGTERM
removes it, and the next conversion to the same output removes those a killed run (SIGKILL, power loss) left
behind.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..load import DRAFTER_DIR, load_safetensors, read_config, resolve, safetensors_files, safetensors_header
from ..models.config import ModelArgs
from ..models.gemma4_assistant import Drafter, DrafterArgs
from ..models.gemma4_text import Model, canonical_key
from ..models.towers import Towers, tower_key
from .quantize import (
    DTYPES,
    RECIPES,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    Plan,
    apply_plan,
    check_options,
    drafter_plan,
    quantizable_modules,
    quantization_config,
    target_plan,
    transform,
)
from .shards import SAFETENSORS_DTYPES, ShardWriter, data_start, read_rows
from .towers import TargetWithTowers
from .towers import keeps as tower_keeps

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
SLICE_BYTES = 256 << 20  # tensors above this are read and converted in row slices of about this size
OWNER_FILE = ".convert-owner.json"  # in a temporary folder: the pid and host of the run writing it
COPY_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "*.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)


@dataclass
class Source:
    """A validated checkpoint: its folder, config, lazily-initialised module tree and weight files."""

    path: Path
    config: dict
    module: nn.Module  # never evaluated: gives names, shapes, module types and `sanitize`
    files: list[Path]
    keep: Callable[[str], bool]


def _args(path: Path, config: dict, parse):
    if "quantization" in config or "quantization_config" in config:
        raise ValueError(
            f"{path / 'config.json'}: the checkpoint is already quantized; convert from the "
            "original (bf16/float) Hugging Face checkpoint"
        )
    try:
        return parse(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from e


def target_source(path: Path, text_only: bool = False) -> Source:
    """Validate a Gemma 4 target checkpoint without reading tensor data. Its towers are kept when the config
    declares them and the weights hold them, unless `text_only` (then the config loses vision/audio_config)."""
    config = read_config(path)
    if config.get("model_type") == "gemma4_assistant":
        raise ValueError(
            f"{path} holds a Gemma 4 drafter; pass its target as hf_path and this as draft_hf_path"
        )
    model = Model(_args(path, config, ModelArgs.from_dict))
    files = safetensors_files(path)
    has_towers = any(tower_key(k) is not None for f in files for k in safetensors_header(f))
    if isinstance(config.get("vision_config"), dict) and has_towers and not text_only:
        module = TargetWithTowers(model, Towers(config, model.args.hidden_size))
        source = Source(path, config, module, files, tower_keeps)
        try:
            check_weights(source)
        except ValueError as e:
            raise ValueError(f"{e}; if only the vision/audio towers are off, convert with --text-only (text_only="
                             "True) to leave them out") from None
        return source
    else:  # text only: a bundle that says so, never a config promising towers it lacks
        config = {k: v for k, v in config.items() if k not in ("vision_config", "audio_config")}
        source = Source(path, config, model, files, lambda k: canonical_key(k) is not None)
    check_weights(source)
    return source


def drafter_source(path: Path, target_args: ModelArgs) -> Source:
    """Validate a `gemma4_assistant` checkpoint and that it matches the target."""
    config = read_config(path)
    args = _args(path, config, DrafterArgs.from_dict)
    try:
        args.validate_against(target_args)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    source = Source(path, config, Drafter(args), safetensors_files(path), lambda k: True)
    check_weights(source)
    return source


def _expected_shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}


def _shape_mismatch(where: Path, got: dict[str, tuple], expected: dict[str, tuple]) -> None:
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = [
        f"{k} {got[k]} (config wants {expected[k]})"
        for k in sorted(got.keys() & expected.keys())
        if got[k] != expected[k]
    ]
    problems = [
        f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise ValueError(f"{where}: weights do not match config.json ({'; '.join(problems)})")


def check_weights(source: Source) -> None:
    """Headers only: every shard is readable, the sanitized names/shapes are exactly the model's, and every
    tensor is floating-point where the model's is (an integer tensor there would convert into garbage)."""
    expected = dict(tree_flatten(source.module.parameters()))
    got = {}
    for file in source.files:
        for name, info in safetensors_header(file).items():
            if name == "__metadata__" or not source.keep(name):
                continue
            # lazy placeholders: sanitize runs on shapes and dtypes, no tensor data is read or allocated
            placeholder = mx.zeros(info["shape"], SAFETENSORS_DTYPES.get(info["dtype"], mx.float32))
            for key, value in source.module.sanitize({name: placeholder}).items():
                floating = mx.issubdtype(expected[key].dtype, mx.floating) if key in expected else None
                if floating is not None and floating != mx.issubdtype(value.dtype, mx.floating):
                    raise ValueError(
                        f"{file}: tensor {name} is stored as {info['dtype']}, but {key} must be "
                        f"{'floating-point' if floating else 'an integer tensor'}; convert from the original "
                        "checkpoint"
                    )
                got[key] = tuple(value.shape)
    _shape_mismatch(source.path, got, _expected_shapes(source.module))


def output_names(module: nn.Module, plan: Plan) -> list[str]:
    """Names of the tensors a conversion writes: the module's parameters, plus scales/biases where quantized."""
    names = []
    for key, _ in tree_flatten(module.parameters()):
        path, leaf = key.rsplit(".", 1)
        names += [key] + ([f"{path}.scales", f"{path}.biases"] if leaf == "weight" and path in plan else [])
    return names


def _sliced_key(source: Source, name: str, info: dict, quantizable: set[str]) -> str | None:
    """The output key of a tensor to convert in row slices (None: convert it whole): a Linear/Embedding
    weight bigger than SLICE_BYTES that sanitize only renames, so its rows convert independently."""
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    shape = info["shape"]
    if dtype is None or len(shape) < 2 or math.prod(shape) * dtype.size <= SLICE_BYTES:
        return None
    placeholder = mx.zeros(shape, dtype)  # lazy: never allocated
    (key, value), *more = source.module.sanitize({name: placeholder}).items() or [(None, None)]
    path, leaf = key.rsplit(".", 1) if key else (None, None)
    ok = not more and value.shape == placeholder.shape and leaf == "weight" and path in quantizable
    return key if ok else None


def _row_slices(source: Source, file: Path, name: str, info: dict, transform_rows) -> Iterator[dict]:
    shape, size = info["shape"], SAFETENSORS_DTYPES[info["dtype"]].size
    step = max(1, SLICE_BYTES // (math.prod(shape[1:]) * size))
    offset = data_start(file)
    for start in range(0, shape[0], step):
        rows = read_rows(file, info, start, min(start + step, shape[0]), offset)
        (w,) = source.module.sanitize({name: rows}).values()
        yield transform_rows(w)
        mx.clear_cache()


def stream_weights(source: Source, folder: Path, plan: Plan, dtype: mx.Dtype, max_shard_size: int) -> int:
    """Read, sanitize, cast/quantize and write the source's tensors one at a time (tensors over SLICE_BYTES
    in row slices); returns bytes written."""
    quantizable = set(quantizable_modules(source.module))
    with ShardWriter(folder, max_shard_size, output_names(source.module, plan)) as writer:
        for file in source.files:
            header = safetensors_header(file)
            names = [k for k in header if k != "__metadata__" and source.keep(k)]
            sliced = {k: key for k in names if (key := _sliced_key(source, k, header[k], quantizable))}
            lazy = load_safetensors([file], lambda k, sliced=sliced: source.keep(k) and k not in sliced)
            for name in names:
                if name in sliced:
                    def rows(w, key=sliced[name]):
                        return transform(key, w, plan, quantizable, dtype)

                    writer.add_rows(_row_slices(source, file, name, header[name], rows), header[name]["shape"][0])
                    continue
                # pop: an evaluated array held here would keep its data, growing to the whole shard
                for key, w in source.module.sanitize({name: lazy.pop(name)}).items():
                    writer.add(transform(key, w, plan, quantizable, dtype))
                mx.clear_cache()  # return freed buffers to the system: peak stays at about one tensor
        return writer.finish()


def verify_written(folder: Path, module: nn.Module, plan: Plan) -> None:
    """The written names and shapes are exactly what `load` builds from the config (quantized as planned)."""
    apply_plan(module, plan)  # lazy: only shapes are used
    got = {}
    for file in safetensors_files(folder):
        got.update({k: tuple(v["shape"]) for k, v in safetensors_header(file).items() if k != "__metadata__"})
    _shape_mismatch(folder, got, _expected_shapes(module))


def output_config(config: dict, dtype: str, quantization: dict | None) -> dict:
    """The source config with the output dtype and, when quantized, mlx-lm's `quantization` entry."""
    config = copy.deepcopy(config)
    for section in (config, config.get("text_config")):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section, dict) and key in section:
                section[key] = dtype
    if quantization is not None:
        config["quantization"] = config["quantization_config"] = quantization
    return config


def copy_support_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template and generation config (hub snapshots hold symlinks: copy their targets)."""
    for pattern in COPY_PATTERNS:
        for file in src.glob(pattern):
            if file.is_file() and not (dst / file.name).exists():
                shutil.copyfile(file, dst / file.name)


def write_part(
    source: Source, folder: Path, plan: Plan, quantization: dict | None, dtype: str, max_shard_size: int
) -> None:
    """One model (target or drafter) into `folder`: shards + index, verified; then config, support files."""
    folder.mkdir(exist_ok=True)
    total = stream_weights(source, folder, plan, DTYPES[dtype], max_shard_size)
    verify_written(folder, source.module, plan)
    config = output_config(source.config, dtype, quantization)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    copy_support_files(source.path, folder)
    bits = {b for _, b in plan.values()}
    print(
        f"[convert] {'drafter' if isinstance(source.module, Drafter) else 'target'} {source.path}: "
        f"{total / 1e6:.1f} MB written, {len(plan)} layers quantized"
        f"{f' ({sorted(bits)} bits)' if bits else ''}",
        file=sys.stderr,
        flush=True,
    )


def _check_output(out: Path, force: bool, sources: list[Path]) -> None:
    for src in sources:
        if out == src.resolve() or out in src.resolve().parents:
            raise ValueError(
                f"mlx_path {out} would overwrite the source checkpoint {src}; choose another folder"
            )
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; remove it or choose another mlx_path")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _make_temp(out: Path) -> Path:
    """A new hidden folder next to `out` with the user's normal permissions (mkdir honours the umask, unlike
    mkdtemp's 0700), holding a marker with this process's pid and host."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        (tmp / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _remove_stale_temps(out: Path) -> None:
    """Remove the temporary folders of conversions to `out` that were killed before they could clean up.

    Only a folder whose marker names a process of this host that no longer exists is removed: one of a live
    (concurrent) conversion, of another host, or without a readable marker is left alone.
    """
    prefix, host = f".{out.name}.tmp-", socket.gethostname()
    for tmp in sorted(out.parent.iterdir()):
        if not tmp.name.startswith(prefix) or tmp.is_symlink() or not tmp.is_dir():
            continue
        try:
            owner = json.loads((tmp / OWNER_FILE).read_text())
            pid, owner_host = owner["pid"], owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner_host != host or type(pid) is not int or pid <= 0 or _pid_alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"[convert] removed {tmp}, left behind by an interrupted conversion (process {pid} has ended)",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def _sigterm_unwinds():
    """While converting, SIGTERM unwinds like Ctrl-C (exit status 143), so the temporary folder is removed.

    Only in the main thread (where Python runs signal handlers) and only in place of the default action
    (terminating at once): a handler the application installed, or SIG_IGN, is left alone. Restored after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, _frame):
        signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an existing `out` is removed only once the new one is there."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    draft_hf_path: str | Path | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    recipe: str = "mixed",
    draft_q_bits: int | None = None,
    dtype: str = "bfloat16",
    force: bool = False,
    report: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    text_only: bool = False,
) -> Path:
    """Convert a Hugging Face Gemma 4 checkpoint (and its MTP drafter) into an MLX bundle folder.

    Args:
        hf_path: local folder or hub id of the target (`gemma4` or `gemma4_text`).
        mlx_path: output folder; refused when it exists unless `force`, replaced only after success.
        draft_hf_path: folder or hub id of the `gemma4_assistant` drafter; default `hf_path/drafter` if any.
        quantize: quantize the target with `q_bits` / `q_group_size` by `recipe` ("uniform" or "mixed").
        draft_q_bits: quantize the drafter too (default: keep it in `dtype`).
        dtype: float type of the non-quantized weights ("bfloat16", "float16", "float32").
        report: afterwards, measure KL / top-1 / MTP acceptance against the source (`quality_report.json`).
        max_shard_size: cap in bytes of each written safetensors shard.
        text_only: leave out the vision/audio towers (a smaller bundle that takes text only).

    Returns:
        The bundle folder, loadable with `mlx_gemma_mtp.load`.
    """
    check_options(q_bits, q_group_size, recipe, dtype, draft_q_bits)
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size={max_shard_size}: must be a positive number of bytes")
    out = Path(mlx_path).expanduser().resolve()
    if out.exists() and not force:  # fail fast, before any download
        _check_output(out, force, [])
    target = target_source(resolve(hf_path, "hf_path"), text_only)
    draft_path = target.path / DRAFTER_DIR if draft_hf_path is None else resolve(draft_hf_path, "draft_hf_path")
    has_drafter = draft_hf_path is not None or draft_path.is_dir()
    drafter = drafter_source(draft_path, target.module.args) if has_drafter else None
    if draft_q_bits is not None and drafter is None:
        raise ValueError(
            f"draft_q_bits={draft_q_bits} but {target.path} has no {DRAFTER_DIR}/; pass draft_hf_path"
        )
    _check_output(out, force, [target.path] + ([drafter.path] if drafter else []))

    t_plan = target_plan(target.module, recipe, q_bits, q_group_size) if quantize else {}
    d_plan = drafter_plan(drafter.module, draft_q_bits, q_group_size) if draft_q_bits else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    with _sigterm_unwinds():
        tmp = _make_temp(out)
        try:
            write_part(
                target,
                tmp,
                t_plan,
                quantization_config(t_plan, q_bits, q_group_size) if quantize else None,
                dtype,
                max_shard_size,
            )
            if drafter is not None:
                d_quant = quantization_config(d_plan, draft_q_bits, q_group_size) if draft_q_bits else None
                write_part(drafter, tmp / DRAFTER_DIR, d_plan, d_quant, dtype, max_shard_size)
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (out / OWNER_FILE).unlink()  # after the rename: a kill before it leaves a marked, removable folder
    if report:
        from .report import format_report, quality_report

        print(format_report(quality_report(out, target.path)))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`convert`'s options; names equal `convert()`'s keyword arguments."""
    p.add_argument("--hf-path", required=True, help="local folder or hub id of the Gemma 4 target")
    p.add_argument(
        "--draft-hf-path",
        default=None,
        help=f"folder or hub id of the gemma4_assistant drafter (default: HF_PATH/{DRAFTER_DIR} if any)",
    )
    p.add_argument("--mlx-path", required=True, help="output bundle folder")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the target")
    p.add_argument(
        "--q-bits", type=int, default=4, help=f"bits per weight, one of {SUPPORTED_BITS} (default 4)"
    )
    p.add_argument(
        "--q-group-size", type=int, default=64, help=f"one of {SUPPORTED_GROUP_SIZES} (default 64)"
    )
    p.add_argument(
        "--recipe",
        default="mixed",
        help=f"one of {RECIPES}: mixed keeps embedding, PLE, edge layers' V/down at 8 bits (default)",
    )
    p.add_argument(
        "--draft-q-bits", type=int, default=None, help="quantize the drafter (default: keep it float)"
    )
    p.add_argument("--dtype", default="bfloat16", help=f"type of unquantized weights, one of {tuple(DTYPES)}")
    p.add_argument("--force", action="store_true", help="replace MLX_PATH if it exists (after success)")
    p.add_argument(
        "--report", action="store_true", help="write quality_report.json (KL, top-1, MTP acceptance)"
    )
    p.add_argument(
        "--text-only", action="store_true", help="leave out the vision/audio towers (text prompts only)"
    )


def run_convert(args: argparse.Namespace) -> None:
    convert(**{k: v for k, v in vars(args).items() if k not in ("func", "command")})


def add_convert_parser(sub) -> None:
    """Register `mlx-gemma-mtp convert`."""
    p = sub.add_parser(
        "convert", help="convert a Hugging Face Gemma 4 checkpoint (+ drafter) to an MLX bundle"
    )
    add_arguments(p)
    p.set_defaults(func=run_convert)


def main(argv: list[str] | None = None) -> int:
    """`python -m mlx_gemma_mtp.convert`: the same options as `mlx-gemma-mtp convert`."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_gemma_mtp.convert", description="Convert a Gemma 4 checkpoint (+ drafter) to MLX."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_convert(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
