"""Load a Gemma 4 target (and optionally its MTP drafter) from a local folder or a hub id.

Supported layouts: the released multimodal checkpoints (`model.language_model.*`; the vision/audio towers are read
on the first prompt with media), text-only HF checkpoints, mlx-lm / mlx-vlm conversions, and bundles written by our converter (target at the
top, drafter in `drafter/`). Weights are safetensors only, single-file or sharded through
`model.safetensors.index.json`; no pickle, no remote code. Tokenizer and chat template go through mlx-lm's
tokenizer utilities; `generation_config.json` gives EOS ids and sampling defaults.
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .distributed.lockstep import Lockstep
from .media.encoder import MediaEncoder, read_processor_config
from .models.config import ModelArgs
from .models.gemma4_assistant import Drafter, DrafterArgs
from .models.gemma4_text import Model, canonical_key
from .models.towers import Towers, tower_key
from .pair_state import PairState
from .prompt import SpecialTokens, special_tokens

DRAFTER_DIR = "drafter"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]
# safetensors dtype names (the format's header) of MLX dtypes, and back
DTYPE_NAMES = {
    mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.float64: "F64", mx.bool_: "BOOL", mx.uint8: "U8",
    mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64", mx.int8: "I8", mx.int16: "I16", mx.int32: "I32",
    mx.int64: "I64",
}
SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass
class GenerationDefaults:
    """From `generation_config.json`: what the checkpoint's authors recommend."""

    eos_token_ids: list[int] = field(default_factory=list)  # with config.json's: every id generation stops at
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    bos_token_id: int | None = None


@dataclass
class Bundle:
    """A loaded target, its drafter (or None) and tokenizer, and the state the pair keeps between generations."""

    target: Model
    drafter: Drafter | None
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper, or None when the folder has no tokenizer
    config: dict
    generation: GenerationDefaults
    path: Path
    special: SpecialTokens = field(default_factory=SpecialTokens)  # BOS and Gemma 4's channel markers
    # compiled draft steps, what "auto" learned, a sharded target's lock-step; made for this target and drafter
    state: PairState | None = field(default=None, repr=False, compare=False)
    # processors and (loaded on first use) towers for images and audio; None for a text-only checkpoint
    media: MediaEncoder | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _owner: int | None = field(default=None, init=False, repr=False, compare=False)

    @contextlib.contextmanager
    def exclusive(self):
        """One generation at a time per bundle (its caches, compiled drafter and RNG use are not shareable):
        another thread waits its turn; the same thread starting a second one while the first is unfinished
        would wait for itself, so that is an error."""
        if self._owner == threading.get_ident():
            raise RuntimeError("this bundle is already generating on this thread: finish the other "
                               "stream_generate, or call .close() on it, before starting another")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def __post_init__(self):
        state = self.state
        if state is None or state.target is not self.target or state.drafter is not self.drafter:
            # `dataclasses.replace(bundle, drafter=...)` is another pair: its own state, the same lock-step
            self.state = PairState(self.target, self.drafter, state.lockstep if state is not None else None)


def resolve(path_or_id: str | Path, role: str = "model") -> Path:
    """A local folder as is; otherwise a hub id downloaded with huggingface_hub (text-model files only).

    `role` ("model", "drafter", ...) names the argument in errors, so a failed download says which id failed.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path
    name = str(path_or_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such folder, and not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except GatedRepoError as e:
        raise FileNotFoundError(f"{role} {name!r} is a gated hub repository: accept its license on the hub, then "
                                f"log in (`hf auth login`) or set HF_TOKEN ({type(e).__name__})") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{role} {name!r}: no such hub repository (or it is private: log in with "
                                f"`hf auth login`), and no such local folder") from e
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{role} {name!r} is not in the local hub cache and the hub cannot be reached (offline, "
            f"HF_HUB_OFFLINE=1 or no network). Download it first (`hf download {name}`) while online, or pass "
            f"the local folder that holds its config.json") from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{role} {name!r}: the hub download failed ({e}); retry, or pass a local folder") from e


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {path} is not a model checkpoint folder")
    return read_json_object(file)


def read_json_object(file: Path) -> dict:
    """A JSON file holding an object, or a ValueError naming the file."""
    try:
        value = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object ({{...}}), not {type(value).__name__}")
    return value


def safetensors_files(path: Path) -> list[Path]:
    """Weight files of a checkpoint: the index's shards (validated) or the folder's `*.safetensors`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shard_names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from e
        files = []
        for name in shard_names:
            if not _plain_file_name(name):
                raise ValueError(f"{index} names shard {name!r} outside the checkpoint folder; refusing to read it")
            # the *name* is checked, not where it resolves: hub snapshots hold symlinks into ../../blobs/
            shard = path / name
            if not shard.is_file():
                raise FileNotFoundError(f"{index} names shard {name!r}, which is missing from {path}")
            files.append(shard)
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path} (only safetensors checkpoints are supported)")
    return files


def _plain_file_name(name) -> bool:
    """A file name inside the folder: no separators, not absolute, not `.`/`..` (path traversal)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def safetensors_header(file: Path) -> dict:
    """Parse and check a safetensors header: names the file when it is truncated or corrupt."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{file}: not a safetensors file or truncated (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from e
    try:  # valid JSON of the wrong shape is corrupt too
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{file}: corrupt safetensors header (bad tensor entry: {e!r})") from e
    if 8 + n + end > size:
        raise ValueError(f"{file}: truncated, tensor data ends at {8 + n + end} bytes but the file has {size}")
    return header


def data_start(file: Path) -> int:
    """Offset of the first tensor byte of a safetensors file."""
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def load_safetensors(files: list[Path], keep: Callable[[str], bool] = lambda k: True) -> dict[str, mx.array]:
    """Tensors whose names pass `keep`, lazily (mx.load reads data only when it is evaluated)."""
    weights = {}
    for file in files:
        names = [k for k in safetensors_header(file) if k != "__metadata__" and keep(k)]
        if names:
            try:
                data = mx.load(str(file))
            except RuntimeError as e:  # MLX's own checks (dtype, shape vs data offsets)
                raise ValueError(f"{file}: corrupt safetensors file ({e})") from e
            weights.update({k: data[k] for k in names})
    return weights


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Cast floating tensors only: integer buffers (token_ordering) and quantized ints stay as they are.

    Empties `weights` and casts one tensor at a time, so each source tensor is freed once its copy exists: the
    source and its cast copy are never held whole together (a bf16 checkpoint loaded in float32 peaks at the
    float32 model plus one source tensor, not plus the bf16 model)."""
    if dtype is None:
        return weights
    out = {}
    for k in list(weights):
        v = weights.pop(k)
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype:
            v = v.astype(dtype)
            mx.eval(v)
        out[k] = v
    return out


def _quantize(module: nn.Module, config: dict, weights: dict[str, mx.array], canonical=lambda k: k) -> None:
    """Turn layers into their quantized forms where the weights carry `.scales` (mlx-lm's config format)."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return
    overrides = {canonical(k): v for k, v in q.items() if isinstance(v, (dict, bool))}

    def predicate(path: str, _module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        return overrides.get(path, True)

    nn.quantize(module, q["group_size"], q["bits"], mode=q.get("mode", "affine"), class_predicate=predicate)


def _load_module(module: nn.Module, weights: dict[str, mx.array], where: Path) -> None:
    # load_weights checks shapes only: an integer tensor where the model computes in floats loads and gives
    # garbage. Integer parameters (token_ordering, quantized weights) must stay integer, floats float.
    expected = dict(tree_flatten(module.parameters()))
    for name, w in weights.items():
        floating = mx.issubdtype(expected[name].dtype, mx.floating) if name in expected else None
        if floating is not None and floating != mx.issubdtype(w.dtype, mx.floating):
            raise ValueError(f"{where}: tensor {name} is stored as {w.dtype}, but the model needs "
                             f"{'a floating-point' if floating else 'an integer'} tensor there (a damaged or "
                             "wrongly converted checkpoint; convert it again from the original)")
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"{where}: weights do not match the config: {e}") from e
    mx.eval(module.parameters())


def target_args(path: Path, config: dict) -> ModelArgs:
    """The target's arguments from its `config.json`, or a clear error (a drafter's folder, a bad config)."""
    if config.get("model_type") == "gemma4_assistant":
        raise ValueError(f"{path} holds a Gemma 4 drafter; load its target and pass this folder as draft=")
    try:
        return ModelArgs.from_dict(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from e


def load_target(path: Path, dtype: mx.Dtype | None = None) -> tuple[Model, dict]:
    config = read_config(path)
    model = Model(target_args(path, config))
    # tensors outside the text model (vision/audio towers) are never read
    raw = load_safetensors(safetensors_files(path), keep=lambda k: canonical_key(k) is not None)
    weights = model.sanitize(_cast(raw, dtype))
    _quantize(model, config, weights, canonical=lambda k: canonical_key(k) or k)
    _load_module(model, weights, path)
    return model, config


def load_towers(path: Path, config: dict, text_hidden_size: int, dtype: mx.Dtype | None = None) -> Towers:
    """The vision (and audio) towers with their embedders, every array evaluated."""
    towers = Towers(config, text_hidden_size)
    raw = load_safetensors(safetensors_files(path), keep=lambda k: tower_key(k) is not None)
    weights = towers.sanitize(_cast(raw, dtype))
    if not weights:
        raise ValueError(f"{path}: config.json declares a vision tower but the weights hold none (a text-only "
                         "conversion?); load the released checkpoint, or convert it again keeping the towers")
    _quantize(towers, config, weights)
    _load_module(towers, weights, path)
    materialize(towers)
    return towers


def media_encoder(path: Path, config: dict, target: Model, dtype: mx.Dtype | None) -> MediaEncoder | None:
    """What the bundle needs for images and audio when the config declares a vision tower, else None."""
    if not isinstance(config.get("vision_config"), dict):
        return None
    hidden = target.args.hidden_size
    # MLX's CPU backend runs bfloat16 ~8x slower than float32 (the audio tower: 39 s vs 4.8 s for 10 s of audio);
    # the towers are small, so on the CPU they run in float32 unless a dtype was asked for
    tower_dtype = dtype if dtype is not None or mx.default_device() != mx.cpu else mx.float32
    return MediaEncoder(config, read_processor_config(path), lambda: load_towers(path, config, hidden, tower_dtype),
                        target.args.use_bidirectional_attention == "vision")


def load_drafter(path: Path, target_args: ModelArgs, dtype: mx.Dtype | None = None) -> Drafter:
    config = read_config(path)
    try:
        args = DrafterArgs.from_dict(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from e
    args.validate_against(target_args)
    drafter = Drafter(args)
    weights = drafter.sanitize(_cast(load_safetensors(safetensors_files(path)), dtype))
    _quantize(drafter, config, weights)
    _load_module(drafter, weights, path)
    return drafter


def _ids(value, where: str) -> list[int]:
    """An id or a list of ids (the two spellings of `eos_token_id`) as a list."""
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{where}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return ids


def materialize(*modules: nn.Module | None) -> None:
    """Evaluate every array a module holds, private ones too (RoPE frequencies are not parameters): an array left
    lazy belongs to the loading thread's stream, and a generation on another thread could not evaluate it."""
    arrays = []
    for module in modules:
        for _, sub in module.named_modules() if module is not None else ():
            # an nn.Module is a dict: arrays are its items, the private ones (`_freqs`) included
            arrays += [v for v in [*sub.values(), *vars(sub).values()] if isinstance(v, mx.array)]
    mx.eval(arrays)


def read_generation_defaults(path: Path, config: dict) -> GenerationDefaults:
    """Sampling defaults of `generation_config.json`, and the EOS ids of it and of `config.json` together (the
    released Gemma 4 configs say [1, 106], their generation configs [1, 106, 50]: stop on all of them)."""
    file = path / "generation_config.json"
    try:
        gen = json.loads(file.read_text()) if file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(gen, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(gen).__name__}")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    eos = _ids(gen.get("eos_token_id"), str(file))
    eos += _ids(config.get("eos_token_id"), str(path / "config.json"))
    eos += _ids(text.get("eos_token_id"), str(path / "config.json"))
    bos = gen.get("bos_token_id", config.get("bos_token_id", text.get("bos_token_id")))
    return GenerationDefaults(list(dict.fromkeys(eos)), gen.get("temperature"), gen.get("top_p"), gen.get("top_k"),
                              bos if isinstance(bos, int) else None)


def load_tokenizer(path: Path, eos_token_ids: list[int]):
    """mlx-lm's TokenizerWrapper (streaming detokenizer, chat template), or None without tokenizer files."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from mlx_lm.tokenizer_utils import load as mlx_lm_load_tokenizer

    return mlx_lm_load_tokenizer(path, eos_token_ids=eos_token_ids)


def load(model: str | Path, draft: str | Path | None = None, dtype: mx.Dtype | None = None) -> Bundle:
    """Load a target and, if given or bundled in `drafter/`, its MTP drafter.

    Args:
        model: local folder or hub id of a Gemma 4 checkpoint or a converted bundle.
        draft: local folder or hub id of the matching `gemma4_assistant` drafter (overrides a bundled one).
        dtype: cast floating weights (e.g. `mx.float32` for exactness tests); default keeps the checkpoint's.
    """
    path = resolve(model, "model")
    target, config = load_target(path, dtype)
    return bundle_of(path, target, config, draft, dtype)


def bundle_of(path: Path, target: Model, config: dict, draft: str | Path | None, dtype: mx.Dtype | None,
              lockstep: Lockstep | None = None) -> Bundle:
    """A loaded target (whole, or sharded with its `lockstep`) with its drafter (`draft`, or one bundled in
    `drafter/`), generation defaults and tokenizer, every array evaluated."""
    draft_path = resolve(draft, "drafter") if draft is not None else path / DRAFTER_DIR
    drafter = load_drafter(draft_path, target.args, dtype) if draft is not None or draft_path.is_dir() else None
    materialize(target, drafter)
    generation = read_generation_defaults(path, config)
    tokenizer = load_tokenizer(path, generation.eos_token_ids)
    special = special_tokens(tokenizer, generation.bos_token_id)
    return Bundle(target, drafter, tokenizer, config, generation, path, special, PairState(target, drafter, lockstep),
                  media_encoder(path, config, target, dtype))
