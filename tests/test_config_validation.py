"""Config and weight validation at load: every bad value gives one ValueError naming the file and the field as
the JSON spells it (`…/config.json: text_config.sliding_window=0 must be a positive integer`), never a
traceback from deep inside the model or a model that silently computes garbage; released configs (both
spellings of the full-attention overrides, the multimodal wrapper, the assistants) still load."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import edit_json

import mlx_gemma_mtp
from mlx_gemma_mtp.models.config import FULL, SLIDING, TEXT_FIELDS, ModelArgs
from mlx_gemma_mtp.models.gemma4_assistant import DrafterArgs


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def setter(**values):
    return lambda c: c.update(values)


def rope(layer_type: str, **values):
    return lambda c: c["rope_parameters"][layer_type].update(values)


# (field as named in the error, edit of the text config, what the value must be)
BAD_TEXT = {
    "sliding_window 0": ("sliding_window=0", setter(sliding_window=0), "a positive integer"),
    "sliding_window < 0": ("sliding_window=-512", setter(sliding_window=-512), "a positive integer"),
    "rms_norm_eps < 0": ("rms_norm_eps=-1e-06", setter(rms_norm_eps=-1e-6), "a number >= 0"),
    "rms_norm_eps string": ("rms_norm_eps='1e-6'", setter(rms_norm_eps="1e-6"), "a number >= 0"),
    "no KV heads": ("num_key_value_heads=0", setter(num_key_value_heads=0), "a positive integer"),
    "string for int": ("hidden_size='64'", setter(hidden_size="64"), "a positive integer"),
    "float for int": ("num_attention_heads=2.0", setter(num_attention_heads=2.0), "a positive integer"),
    "bool for int": ("head_dim=True", setter(head_dim=True), "a positive integer"),
    "null for int": ("intermediate_size=None", setter(intermediate_size=None), "a positive integer"),
    "negative count": ("num_kv_shared_layers=-1", setter(num_kv_shared_layers=-1), "an integer >= 0"),
    "string for bool": ("use_double_wide_mlp='false'", setter(use_double_wide_mlp="false"), "true or false"),
    "softcap 0": ("final_logit_softcapping=0", setter(final_logit_softcapping=0), "a positive number or"),
    "max positions 0": ("max_position_embeddings=0", setter(max_position_embeddings=0), "a positive integer"),
    "global KV heads 0": (
        "num_global_key_value_heads=0", setter(num_global_key_value_heads=0), "a positive integer or null"
    ),
    "layer_types string": ("layer_types='sliding_attention'", setter(layer_types=SLIDING), "a list of"),
    "rope_parameters list": ("rope_parameters=[]", setter(rope_parameters=[]), "a JSON object or null"),
    "rope entry not object": (
        "rope_parameters.full_attention=1000000.0", lambda c: c["rope_parameters"].update({FULL: 1e6}),
        "a JSON object",
    ),
    "rope_theta string": (
        "rope_parameters.sliding_attention.rope_theta='10000'", rope(SLIDING, rope_theta="10000"),
        "a positive number",
    ),
    "partial rotary > 1": (
        "rope_parameters.full_attention.partial_rotary_factor=2", rope(FULL, partial_rotary_factor=2),
        r"a number in \(0, 1\]",
    ),
}


@pytest.fixture
def target(target_dir, tmp_path):
    """(layout) -> a private copy of the tiny E2B target, safe to damage."""
    return lambda layout="text": copy_of(target_dir("e2b", layout), tmp_path / f"ckpt-{layout}")


@pytest.mark.parametrize("case", list(BAD_TEXT))
@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_bad_target_config_value_names_file_and_field(case, layout, target):
    field, edit, want = BAD_TEXT[case]
    path = target(layout)
    edit_json(path / "config.json", lambda c: edit(c.get("text_config", c)))
    where = "text_config." if layout == "multimodal" else ""
    message = rf"{re.escape(str(path / 'config.json'))}: {re.escape(where + field)} must be {want}"
    with pytest.raises(ValueError, match=message):
        mlx_gemma_mtp.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (setter(per_layer_config={"x": {"head_dim": 32}}), r"per_layer_config has key 'x': must be a layer"),
        (setter(per_layer_config={"8": {"head_dim": 32}}), r"per_layer_config has key '8': must be a layer"),
        (setter(per_layer_config={"7": {"head_dim": 0}}), r"per_layer_config\.7\.head_dim=0 must be a"),
        (setter(per_layer_config={"7": [32]}), r"per_layer_config\.7=\[32\] must be a JSON object"),
        (
            setter(enable_moe_block=True, num_experts=2, top_k_experts=4, moe_intermediate_size=16),
            r"unsupported Gemma 4 config: text_config\.top_k_experts=4 \(must be <= num_experts=2\)",
        ),
    ],
    ids=["key", "key-range", "head_dim", "entry", "top_k"],
)
def test_bad_nested_target_values(edit, message, target):
    path = target("multimodal")
    edit_json(path / "config.json", lambda c: edit(c["text_config"]))
    with pytest.raises(ValueError, match=rf"config\.json: (text_config\.)?{message}"):
        mlx_gemma_mtp.load(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", r"config\.json must hold a JSON object \(\{\.\.\.\}\), not list"),
        ('"gemma4"', r"config\.json must hold a JSON object \(\{\.\.\.\}\), not str"),
        ('{"model_type": "gemma4"}', r"config\.json: text_config=None must be a JSON object"),
        ('{"model_type": "gemma4", "text_config": [1]}', r"config\.json: text_config=\[1\] must be a JSON"),
    ],
    ids=["array", "string", "no-text-config", "text-config-array"],
)
def test_config_of_the_wrong_shape(content, message, target):
    path = target()
    (path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        mlx_gemma_mtp.load(path)


# ------------------------------------------------------------------------------------------------------------
# Drafter config
# ------------------------------------------------------------------------------------------------------------


def text(**values):
    return lambda c: c["text_config"].update(values)


BAD_DRAFTER = {
    "no KV heads": (text(num_key_value_heads=0), r"text_config\.num_key_value_heads=0 must be a positive"),
    "sliding_window 0": (text(sliding_window=0), r"text_config\.sliding_window=0 must be a positive integer"),
    "rms_norm_eps < 0": (text(rms_norm_eps=-1.0), r"text_config\.rms_norm_eps=-1\.0 must be a number >= 0"),
    "string for int": (text(hidden_size="32"), r"text_config\.hidden_size='32' must be a positive integer"),
    "backbone string": (
        setter(backbone_hidden_size="64"), r"backbone_hidden_size='64' must be a positive integer"
    ),
    "backbone missing": (lambda c: c.pop("backbone_hidden_size"), r"backbone_hidden_size is missing"),
    "text_config missing": (lambda c: c.pop("text_config"), r"text_config is missing"),
    "text_config array": (setter(text_config=[]), r"text_config=\[\] must be a JSON object"),
    "ordered string": (setter(use_ordered_embeddings="true"), r"use_ordered_embeddings='true' must be true"),
    "no centroids": (setter(num_centroids=0), r"num_centroids=0 must be a positive integer"),
    "centroids vs vocab": (setter(num_centroids=7), r"num_centroids=7 must divide text_config\.vocab_size"),
    "top-k > centroids": (
        setter(centroid_intermediate_top_k=17), r"centroid_intermediate_top_k=17 must be <= num_centroids=16"
    ),
    "unsupported": (
        text(hidden_activation="relu"), r"unsupported Gemma 4 config: text_config\.hidden_activation='relu'"
    ),
}


@pytest.mark.parametrize("case", list(BAD_DRAFTER))
def test_bad_drafter_config_value_names_file_and_field(case, pair_dir, tmp_path):
    edit, message = BAD_DRAFTER[case]
    src = pair_dir("e2b")[0]
    drafter = copy_of(src / "drafter", tmp_path / "drafter")
    edit_json(drafter / "config.json", edit)
    with pytest.raises(ValueError, match=rf"{re.escape(str(drafter / 'config.json'))}: {message}"):
        mlx_gemma_mtp.load(src, draft=drafter)


def test_drafter_config_array(pair_dir, tmp_path):
    src = pair_dir("e2b")[0]
    drafter = copy_of(src / "drafter", tmp_path / "drafter")
    (drafter / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"drafter/config\.json must hold a JSON object"):
        mlx_gemma_mtp.load(src, draft=drafter)


# ------------------------------------------------------------------------------------------------------------
# Weights of the wrong kind
# ------------------------------------------------------------------------------------------------------------


def _store_as(file: Path, name: str, dtype: mx.Dtype) -> None:
    weights = mx.load(str(file))
    weights[name] = weights[name].astype(dtype)
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [mx.int32, mx.int64])
def test_integer_weight_where_floats_belong(dtype, target_dir, tmp_path):
    """Before: loaded, and the model computed with integer-truncated weights."""
    path = copy_of(target_dir("31b", "text", None), tmp_path / "ckpt")
    _store_as(path / "model.safetensors", "model.layers.0.self_attn.q_proj.weight", dtype)
    with pytest.raises(
        ValueError,
        match=rf"ckpt: tensor model\.layers\.0\.self_attn\.q_proj\.weight is stored as {dtype}, but the "
        "model needs a floating-point tensor",
    ):
        mlx_gemma_mtp.load(path)


def test_integer_drafter_weight_refused_integer_token_ordering_kept(pair_dir, tmp_path):
    """The drafter too; its integer `token_ordering` (int64 in the released files) is legitimately integer."""
    src = pair_dir("e2b")[0]
    drafter = copy_of(src / "drafter", tmp_path / "drafter")
    (file,) = drafter.glob("*.safetensors")
    assert mx.load(str(file))["masked_embedding.token_ordering"].dtype == mx.int64
    assert mlx_gemma_mtp.load(src, draft=drafter).drafter.masked_embedding.token_ordering.dtype == mx.int32
    _store_as(file, "pre_projection.weight", mx.int32)
    with pytest.raises(ValueError, match=r"drafter: tensor pre_projection\.weight is stored as .*int32"):
        mlx_gemma_mtp.load(src, draft=drafter)


# ------------------------------------------------------------------------------------------------------------
# What must keep working
# ------------------------------------------------------------------------------------------------------------


def _released_text(kind: str) -> dict:
    """`text_config` of a released target as its hub config.json spells it (REAL_CHECKPOINTS.md)."""
    s, f = SLIDING, FULL
    common = {
        "model_type": "gemma4_text", "vocab_size": 262144, "vocab_size_per_layer_input": 262144,
        "head_dim": 256, "global_head_dim": 512, "rms_norm_eps": 1e-06, "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": "bfloat16",
        "use_bidirectional_attention": "vision", "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "rope_parameters": {
            s: {"rope_type": "default", "rope_theta": 10000.0},
            f: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "enable_moe_block": False, "num_experts": None, "top_k_experts": None, "moe_intermediate_size": None,
    }
    if kind == "e2b":
        return {**common, "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 35,
                "layer_types": [s, s, s, s, f] * 7, "num_attention_heads": 8, "num_key_value_heads": 1,
                "num_global_key_value_heads": None, "attention_k_eq_v": False, "sliding_window": 512,
                "max_position_embeddings": 131072, "num_kv_shared_layers": 20,
                "hidden_size_per_layer_input": 256, "use_double_wide_mlp": True}
    assert kind == "26b"
    return {**common, "hidden_size": 2816, "intermediate_size": 2112, "num_hidden_layers": 30,
            "layer_types": [s, s, s, s, s, f] * 5, "num_attention_heads": 16, "num_key_value_heads": 8,
            "num_global_key_value_heads": 2, "attention_k_eq_v": True, "sliding_window": 1024,
            "max_position_embeddings": 262144, "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0,
            "use_double_wide_mlp": False, "enable_moe_block": True, "num_experts": 128, "top_k_experts": 8,
            "moe_intermediate_size": 704}


def _released_assistant(target_text: dict, ordered: bool) -> dict:
    s, f = SLIDING, FULL
    copied = ("vocab_size", "head_dim", "global_head_dim", "num_key_value_heads",
              "num_global_key_value_heads", "attention_k_eq_v", "sliding_window", "rope_parameters",
              "rms_norm_eps", "max_position_embeddings")
    hidden = 256 if ordered else 1024
    text = {**{k: target_text[k] for k in copied}, "model_type": "gemma4_text", "hidden_size": hidden,
            "intermediate_size": 8 * hidden, "num_attention_heads": target_text["num_attention_heads"],
            "num_hidden_layers": 4, "layer_types": [s, s, s, f], "num_kv_shared_layers": 4,
            "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 262144,
            "final_logit_softcapping": None, "enable_moe_block": False, "use_double_wide_mlp": False,
            "num_experts": None, "top_k_experts": None, "moe_intermediate_size": None}
    return {"model_type": "gemma4_assistant", "architectures": ["Gemma4AssistantForCausalLM"],
            "backbone_hidden_size": target_text["hidden_size"], "use_ordered_embeddings": ordered,
            "num_centroids": 2048, "centroid_intermediate_top_k": 32, "tie_word_embeddings": True,
            "dtype": "bfloat16", "text_config": text}


def _per_layer_spelling(text: dict) -> dict:
    """transformers >= 5.15's `save_pretrained`: `per_layer_config` instead of the global_* keys."""
    out = {k: v for k, v in text.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
    full = {"head_dim": text["global_head_dim"]}
    if text["attention_k_eq_v"]:
        full["num_key_value_heads"] = text["num_global_key_value_heads"]
    out["per_layer_config"] = {str(i): full for i, t in enumerate(text["layer_types"]) if t == FULL}
    return out


@pytest.mark.parametrize("kind, ordered", [("e2b", True), ("26b", False)])
@pytest.mark.parametrize("spelling", ["hub", "per_layer_config"])
def test_released_configs_parse(kind, ordered, spelling):
    text = _released_text(kind)
    if spelling == "per_layer_config":
        text = _per_layer_spelling(text)
    wrapper = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
               "text_config": text, "vision_config": {"hidden_size": 768}, "eos_token_id": [1, 106],
               "image_token_id": 258880}
    args = ModelArgs.from_dict(json.loads(json.dumps(wrapper)))
    assert args == ModelArgs.from_dict(json.loads(json.dumps(text)))
    full = [i for i, t in enumerate(args.layer_types) if t == FULL]
    assert {args.layer_head_dims[i] for i in full} == {512} and args.layer_head_dims[0] == 256
    assert args.max_position_embeddings == text["max_position_embeddings"]
    assistant = _released_assistant(_released_text(kind), ordered)
    if spelling == "per_layer_config":
        assistant["text_config"] = _per_layer_spelling(assistant["text_config"])
    drafter = DrafterArgs.from_dict(json.loads(json.dumps(assistant)))
    drafter.validate_against(args)
    assert drafter.text.num_kv_shared_layers == 4 and drafter.use_ordered_embeddings is ordered


def test_every_config_field_has_a_rule():
    assert set(TEXT_FIELDS) == {f.name for f in dataclasses.fields(ModelArgs) if f.init}


def test_direct_construction_is_checked_too():
    """Code that builds ModelArgs itself gets the same readable error (was: ZeroDivisionError)."""
    with pytest.raises(ValueError, match=r"^num_key_value_heads=0 must be a positive integer$"):
        ModelArgs(num_key_value_heads=0)


def test_max_position_embeddings_is_read(target_dir, tmp_path):
    assert mlx_gemma_mtp.load(target_dir("e2b", "multimodal")).target.args.max_position_embeddings == 4096
    path = copy_of(target_dir("31b", "text", None), tmp_path / "ckpt")
    edit_json(path / "config.json", lambda c: c.pop("max_position_embeddings"))
    assert mlx_gemma_mtp.load(path).target.args.max_position_embeddings == 131072  # transformers' default
