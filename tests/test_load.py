"""Loading: checkpoint layouts (multimodal, text-only, sharded, mlx-lm keys), sanitize idempotence, tokenizer
and generation config, and a readable error for every kind of bad input. HF writes the checkpoints."""

from __future__ import annotations

import importlib
import json
import shutil
import struct
from pathlib import Path

import hf_oracle as oracle
import mlx.core as mx
import numpy as np
import pytest
from conftest import edit_json, write_tokenizer
from mlx.utils import tree_flatten

import mlx_gemma_mtp
from mlx_gemma_mtp.load import load_safetensors, safetensors_files

TOWERS = ("vision", "audio")
load_module = importlib.import_module("mlx_gemma_mtp.load")  # the package exports a function `load`


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def assert_same_params(a, b) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert mx.array_equal(pa[k], pb[k]).item(), k


def logits_diff(model, hf, n: int = 12) -> float:
    ids = [int(t) for t in np.random.default_rng(0).integers(6, 256, size=n)]
    ref = oracle.target_forward(hf, ids)["logits"].numpy()
    return float(np.abs(np.array(model(mx.array([ids]))) - ref).max())


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_multimodal_checkpoint_loads_text_model_only(kind, target_dir, hf_target, monkeypatch):
    path = target_dir(kind, "multimodal")
    stored = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(t in k for k in stored for t in TOWERS), "the checkpoint has no vision/audio tower to skip"
    assert all(k.startswith("model.language_model.") or any(t in k for t in TOWERS) for k in stored)
    read = []

    def spy(files, keep=lambda k: True):
        weights = load_safetensors(files, keep)
        read.extend(weights)
        return weights

    monkeypatch.setattr(load_module, "load_safetensors", spy)
    bundle = mlx_gemma_mtp.load(path)
    assert read and not [k for k in read if any(t in k for t in TOWERS)], "tower tensors were read"
    assert not [k for k in params(bundle.target) if any(t in k for t in TOWERS)]
    assert bundle.drafter is None and bundle.tokenizer is None
    assert bundle.config["model_type"] == "gemma4"
    assert logits_diff(bundle.target, hf_target(kind)) <= 1e-4


def test_text_multimodal_sharded_and_single_file_give_the_same_model(target_dir, hf_target):
    sharded, single = target_dir("e2b", "text", "50KB"), target_dir("e2b", "text", None)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()
    text = mlx_gemma_mtp.load(single)
    assert text.config["model_type"] == "gemma4_text"
    assert logits_diff(text.target, hf_target("e2b")) <= 1e-4
    assert_same_params(text.target, mlx_gemma_mtp.load(sharded).target)
    assert_same_params(text.target, mlx_gemma_mtp.load(target_dir("e2b", "multimodal")).target)


@pytest.mark.parametrize("kind, layout", [("31b", "text"), ("e2b", "multimodal")])
def test_save_pretrained_config_spelling(kind, layout, hf_target, tmp_path):
    """Plain `save_pretrained` writes `per_layer_config` ({layer: head_dim, num_key_value_heads}) instead of
    the released `global_head_dim` / `num_global_key_value_heads`; both spellings load the same model."""
    model = hf_target(kind) if layout == "text" else oracle.make_target(kind, seed=0, layout=layout)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    text = config.get("text_config", config)
    assert text.get("per_layer_config") and text.get("global_head_dim") is None
    assert logits_diff(mlx_gemma_mtp.load(tmp_path).target, hf_target(kind)) <= 1e-4


def test_index_lists_only_shards_in_use(target_dir, tmp_path, hf_target):
    """With an index, stray `*.safetensors` files in the folder are ignored (only the index's shards)."""
    path = copy_of(target_dir("e4b"), tmp_path)
    (path / "consolidated.safetensors").write_bytes(b"not a safetensors file")
    assert logits_diff(mlx_gemma_mtp.load(path).target, hf_target("e4b")) <= 1e-4


# ------------------------------------------------------------------------------------------------------------
# sanitize
# ------------------------------------------------------------------------------------------------------------


def raw_weights(path: Path) -> dict[str, mx.array]:
    return load_safetensors(safetensors_files(path))


@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_sanitize_is_idempotent_and_layout_independent(kind, target_dir):
    model = mlx_gemma_mtp.load(target_dir(kind)).target
    raw = raw_weights(target_dir(kind, "multimodal"))
    text_keys = {k: v for k, v in raw.items() if k.startswith("model.language_model.")}
    # What real checkpoints also carry: the tied head and K/V weights of KV-shared layers (never used).
    extra = {"lm_head.weight": raw["model.language_model.embed_tokens.weight"]}
    for i in range(model.args.first_kv_shared_layer, model.args.num_hidden_layers):
        extra[f"model.language_model.layers.{i}.self_attn.k_proj.weight"] = mx.zeros((16, 64))
        extra[f"model.language_model.layers.{i}.self_attn.k_norm.weight"] = mx.zeros((16,))
    clean = model.sanitize({**raw, **extra})
    assert clean.keys() == params(model).keys(), "sanitized keys differ from the module tree"

    variants = {
        "sanitized twice": clean,
        "HF text-only": raw_weights(target_dir(kind)),
        "mlx-lm / mlx-vlm": {
            **{
                k.replace("model.language_model.", "language_model.model.", 1): v
                for k, v in text_keys.items()
            },
            "language_model.lm_head.weight": extra["lm_head.weight"],
            "vision_tower.encoder.layers.0.weight": mx.zeros((2,)),
        },
    }
    for name, weights in variants.items():
        again = model.sanitize(weights)
        assert again.keys() == clean.keys(), name
        assert all(mx.array_equal(again[k], clean[k]).item() for k in clean), name


def test_sanitize_splits_fused_experts(target_dir):
    model = mlx_gemma_mtp.load(target_dir("moe")).target
    raw = raw_weights(target_dir("moe"))
    clean = model.sanitize(raw)
    fused = raw["model.layers.0.experts.gate_up_proj"]  # (E, 2 * moe_intermediate, H): gate first
    mi = model.args.moe_intermediate_size
    assert fused.shape == (8, 2 * mi, 64)
    assert mx.array_equal(clean["model.layers.0.experts.switch_glu.gate_proj.weight"], fused[:, :mi]).item()
    assert mx.array_equal(clean["model.layers.0.experts.switch_glu.up_proj.weight"], fused[:, mi:]).item()
    assert not [k for k in clean if "gate_up_proj" in k]


# ------------------------------------------------------------------------------------------------------------
# Tokenizer, chat template, generation config
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_tokenizer(target_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("with-tokenizer")
    shutil.copytree(target_dir("e2b"), path, dirs_exist_ok=True)
    write_tokenizer(path)
    return mlx_gemma_mtp.load(path)


def test_tokenizer_chat_template_and_generation_config(with_tokenizer):
    bundle = with_tokenizer
    tok = bundle.tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    assert len(ids) > 3 and tok.decode(ids) == text
    assert tok.has_chat_template
    chat = list(
        tok.apply_chat_template([{"role": "user", "content": "Hello world!"}], add_generation_prompt=True)
    )
    assert all(isinstance(t, int) for t in chat)
    assert tok.decode(chat) == "<bos><start_of_turn>user\nHello world!<end_of_turn>\n<start_of_turn>model\n"
    assert bundle.generation.eos_token_ids == oracle.EOS_TOKEN_IDS == [1, 106]
    assert (bundle.generation.temperature, bundle.generation.top_p, bundle.generation.top_k) == (
        1.0,
        0.95,
        64,
    )
    assert set(oracle.EOS_TOKEN_IDS) <= set(tok.eos_token_ids)


@pytest.mark.parametrize("prompt", ["The quick brown fox", [{"role": "user", "content": "Hello world!"}]])
def test_string_and_chat_prompts_generate(with_tokenizer, prompt):
    bundle = with_tokenizer
    tok = bundle.tokenizer
    expected_ids = (
        [bundle.special.bos, *tok.encode(prompt)]  # this tokenizer adds no BOS itself
        if isinstance(prompt, str)
        else list(tok.apply_chat_template(prompt, add_generation_prompt=True))
    )
    responses = list(mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=8, num_draft_tokens=0))
    assert 1 <= len(responses) <= 8
    assert all(r.prompt_tokens == len(expected_ids) for r in responses)
    assert responses[-1].finish_reason in ("stop", "length")
    by_ids = [
        r.token for r in mlx_gemma_mtp.stream_generate(bundle, expected_ids, max_tokens=8, num_draft_tokens=0)
    ]
    assert [r.token for r in responses] == by_ids
    assert isinstance("".join(r.text for r in responses), str)


def test_folder_without_tokenizer_rejects_text_prompts(target_dir):
    bundle = mlx_gemma_mtp.load(target_dir("31b", "text", None))
    assert bundle.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        next(mlx_gemma_mtp.stream_generate(bundle, "hello", max_tokens=2))


# ------------------------------------------------------------------------------------------------------------
# Bad input: each error names the file and the problem
# ------------------------------------------------------------------------------------------------------------


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        mlx_gemma_mtp.load(tmp_path / "does-not-exist")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        mlx_gemma_mtp.load(tmp_path / "weights.bin")


def test_missing_config(target_dir, tmp_path):
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/config\.json is missing"):
        mlx_gemma_mtp.load(path)


def test_invalid_config_json(target_dir, tmp_path):
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        mlx_gemma_mtp.load(path)


def test_wrong_model_type(target_dir, tmp_path):
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    edit_json(path / "config.json", lambda c: c.update(model_type="llama"))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'llama' is not a Gemma 4 target"):
        mlx_gemma_mtp.load(path)


def test_drafter_folder_passed_as_target(pair_dir):
    path = pair_dir("e2b")[0] / "drafter"
    with pytest.raises(ValueError, match="holds a Gemma 4 drafter"):
        mlx_gemma_mtp.load(path)


def test_no_weights(target_dir, tmp_path):
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights in .*ckpt"):
        mlx_gemma_mtp.load(path)


def test_truncated_safetensors(target_dir, tmp_path):
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        mlx_gemma_mtp.load(path)
    file.write_bytes(data[:5])  # not even the header length
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file or truncated"):
        mlx_gemma_mtp.load(path)


def test_corrupt_safetensors_header(target_dir, tmp_path):
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 : 8 + n] = b"{" + b"\xff" * (n - 1)
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
        mlx_gemma_mtp.load(path)
    data[:8] = struct.pack("<Q", 1 << 40)  # header length beyond the file
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file or truncated"):
        mlx_gemma_mtp.load(path)


def _tensor_entries(header: dict, **changes) -> dict:
    return {k: v if k == "__metadata__" else {**v, **changes} for k, v in header.items()}


@pytest.mark.parametrize(
    "problem, edit, message",
    [
        ("a list", lambda h: [1, 2], "corrupt safetensors header"),
        (
            "no data_offsets",
            lambda h: {k: {"dtype": "F32", "shape": [1]} for k in h},
            "corrupt safetensors header",
        ),
        ("unknown dtype", lambda h: _tensor_entries(h, dtype="ZZ"), "corrupt safetensors file"),
        ("shape vs offsets", lambda h: _tensor_entries(h, shape=[3, 3]), "corrupt safetensors file"),
    ],
    ids=["list", "no-offsets", "dtype", "shape"],
)
def test_header_of_the_wrong_shape(target_dir, tmp_path, problem, edit, message):
    """Valid JSON but not a valid header: a ValueError naming the file, not a KeyError or RuntimeError."""
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(edit(json.loads(data[8 : 8 + n]))).encode()
    header += b" " * max(0, n - len(header))  # keep the data offsets valid where the header still allows
    file.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])
    with pytest.raises(ValueError, match=rf"model\.safetensors: {message}"):
        mlx_gemma_mtp.load(path)


def test_invalid_generation_config(target_dir, tmp_path):
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    (path / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON"):
        mlx_gemma_mtp.load(path)


def test_shard_named_in_index_is_missing(target_dir, tmp_path):
    path = copy_of(target_dir("e4b"), tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard '{shard.name}', which is missing"):
        mlx_gemma_mtp.load(path)


def test_index_shard_outside_the_folder(target_dir, tmp_path):
    path = copy_of(target_dir("e4b"), tmp_path)
    first = min(path.glob("model-*.safetensors"))
    shutil.copy(first, tmp_path / "x.safetensors")  # exists, so only the path check can stop it

    def escape(index):
        for k, v in index["weight_map"].items():
            if v == first.name:
                index["weight_map"][k] = "../x.safetensors"

    edit_json(path / "model.safetensors.index.json", escape)
    with pytest.raises(ValueError, match=r"names shard '\.\./x\.safetensors' outside the checkpoint folder"):
        mlx_gemma_mtp.load(path)


def test_invalid_index(target_dir, tmp_path):
    path = copy_of(target_dir("e4b"), tmp_path)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not a valid safetensors index"):
        mlx_gemma_mtp.load(path)


def test_weights_that_do_not_match_the_config(target_dir, tmp_path):
    path = copy_of(target_dir("31b", "text", None), tmp_path)
    edit_json(path / "config.json", lambda c: c.update(intermediate_size=128))
    with pytest.raises(ValueError, match="weights do not match the config"):
        mlx_gemma_mtp.load(path)


def _set_rope_yarn(cfg):
    cfg["rope_parameters"]["sliding_attention"]["rope_type"] = "yarn"


def _set_unknown_layer_type(cfg):
    cfg["layer_types"][0] = "chunked_attention"


@pytest.mark.parametrize(
    "field, edit",
    [
        ("hidden_activation", lambda c: c.update(hidden_activation="relu")),
        ("use_bidirectional_attention", lambda c: c.update(use_bidirectional_attention="all")),
        ("rope_parameters", _set_rope_yarn),
        ("layer_types", _set_unknown_layer_type),
        ("layer_types", lambda c: c.update(layer_types=c["layer_types"][:-1])),
        ("tie_word_embeddings", lambda c: c.update(tie_word_embeddings=False)),
        ("attention_bias", lambda c: c.update(attention_bias=True)),
        ("num_key_value_heads", lambda c: c.update(num_key_value_heads=3)),
    ],
)
@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_unsupported_config_values(target_dir, tmp_path, field, edit, layout):
    path = copy_of(target_dir("e2b", layout), tmp_path)
    edit_json(path / "config.json", lambda c: edit(c.get("text_config", c)))
    where = r"text_config\." if layout == "multimodal" else ""  # the field as the JSON spells it
    with pytest.raises(ValueError, match=rf"config\.json: unsupported Gemma 4 config: {where}{field}="):
        mlx_gemma_mtp.load(path)


def test_cast_holds_one_source_tensor_at_a_time(target_dir, monkeypatch):
    """`load(..., dtype=)` casts tensor by tensor, emptying the source dict as it goes: a source tensor is freed
    once its copy exists, so the source and its cast copy are never held whole together."""
    raw = load_safetensors(safetensors_files(target_dir("e2b", "text", None)))
    n, seen, real_eval = len(raw), [], mx.eval

    def spy_eval(*arrays):
        seen.append(len(raw))  # source tensors still held when a cast is evaluated
        return real_eval(*arrays)

    monkeypatch.setattr(load_module.mx, "eval", spy_eval)
    cast = load_module._cast(raw, mx.bfloat16)
    monkeypatch.undo()
    assert raw == {} and len(cast) == n and all(v.dtype == mx.bfloat16 for v in cast.values())
    assert seen == list(range(n - 1, -1, -1))  # one cast evaluated per source tensor dropped
    assert load_module._cast(cast, None) is cast
