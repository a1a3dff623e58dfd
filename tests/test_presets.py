"""Shape presets: the released configs, parameter counts from shapes, random pairs of tiny cuts in bf16 and
quantized, and HF checkpoints of them on disk (loaded back, MTP == plain)."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma_mtp import SamplerConfig, load, stream_generate
from mlx_gemma_mtp.load import safetensors_header
from mlx_gemma_mtp.models.config import FULL, SLIDING, ModelArgs
from mlx_gemma_mtp.models.gemma4_assistant import Drafter, DrafterArgs
from mlx_gemma_mtp.models.gemma4_text import Model
from mlx_gemma_mtp.testing.presets import (
    PRESETS,
    drafter_tensors,
    main,
    parameter_count,
    preset_config,
    random_pair,
    target_tensors,
    write_hf_checkpoint,
)

S, F = SLIDING, FULL
# spec §7.1/§7.2: hidden, layers, heads, sliding KV heads, full-layer KV heads, window, KV-shared layers, PLE,
# k_eq_v, producers (sliding, full), max positions; assistant hidden, intermediate, heads, clustered head
RELEASED = {
    "e2b": (1536, 35, 8, 1, 1, 512, 20, 256, False, (13, 14), 131072, (256, 2048, 4, True)),
    "e4b": (2560, 42, 8, 2, 2, 512, 18, 256, False, (22, 23), 131072, (256, 2048, 4, True)),
    "26b-a4b": (2816, 30, 16, 8, 2, 1024, 0, 0, True, (28, 29), 262144, (1024, 8192, 16, False)),
    "31b": (5376, 60, 32, 16, 4, 1024, 0, 0, True, (58, 59), 262144, (1024, 8192, 32, False)),
}
# spec §7: parameters computed from the released shapes (text model; assistant)
SPEC_PARAMETERS = {"e2b": (4.63e9, 77.7e6), "e4b": (7.46e9, 78.52e6), "26b-a4b": (25.23e9, 419.7e6),
                   "31b": (30.70e9, 469.5e6)}
# minimal valid cuts (e2b/e4b: a KV-shared layer and a double-wide MLP remain); vocabulary 512
CUTS = {"e2b": {"layers": 3}, "e4b": {"layers": 3}, "26b-a4b": {"layers": 2, "experts": 16},
        "31b": {"layers": 2}}
# the 31B cut has 1 B parameters and MLX's CPU quantized matmuls run ~0.2 GMAC/s: 20 s, in the slow job
CASES = [pytest.param(shape, bits, marks=[pytest.mark.slow] if (shape, bits) == ("31b", 4) else [])
         for shape in PRESETS for bits in (16, 4)]


@pytest.mark.parametrize("shape", PRESETS)
def test_released_configs_parse_with_the_released_values(shape):
    target, assistant = preset_config(shape)
    args = ModelArgs.from_dict(target)
    drafter = DrafterArgs.from_dict(assistant)
    drafter.validate_against(args)
    hidden, layers, heads, kv, full_kv, window, shared, ple, k_eq_v, producers, positions, d = RELEASED[shape]
    assert (target["model_type"], target["eos_token_id"]) == ("gemma4", [1, 106])
    assert (target["image_token_id"], target["audio_config"] is not None) == (258880, shape in ("e2b", "e4b"))
    assert target["text_config"]["num_global_key_value_heads"] == (full_kv if k_eq_v else None)
    assert (args.hidden_size, args.num_hidden_layers, args.num_attention_heads) == (hidden, layers, heads)
    assert (args.sliding_window, args.num_kv_shared_layers) == (window, shared)
    assert (args.hidden_size_per_layer_input, args.attention_k_eq_v) == (ple, k_eq_v)
    assert (args.max_position_embeddings, args.vocab_size) == (positions, 262144)
    assert (args.final_logit_softcapping, args.rms_norm_eps) == (30.0, 1e-6)
    assert args.rope_parameters[F] == {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                       "rope_theta": 1e6}
    period = 5 if shape == "e2b" else 6
    assert args.layer_types == [F if (i + 1) % period == 0 else S for i in range(layers)]
    assert {args.layer_head_dims[i] for i in range(layers)} == {256, 512}
    assert [args.layer_kv_heads[i] for i in producers] == [kv, full_kv]
    assert (args.kv_producer(S), args.kv_producer(F)) == producers
    assert drafter.backbone_hidden_size == hidden
    assert (drafter.text.hidden_size, drafter.text.intermediate_size) == d[:2]
    assert (drafter.text.num_attention_heads, drafter.use_ordered_embeddings) == d[2:]
    assert (drafter.num_centroids, drafter.centroid_intermediate_top_k) == (2048, 32)
    assert drafter.text.layer_types == [S, S, S, F] and drafter.text.num_kv_shared_layers == 4
    assert drafter.text.final_logit_softcapping is None


def test_released_widths_of_the_mlp_and_the_experts():
    e2b = ModelArgs.from_dict(preset_config("e2b")[0])
    assert e2b.use_double_wide_mlp and e2b.first_kv_shared_layer == 15  # 12288 on layers 15-34
    tensors = target_tensors(preset_config("26b-a4b")[0])
    assert tensors["model.language_model.layers.0.experts.gate_up_proj"].shape == (128, 1408, 2816)
    assert tensors["model.language_model.layers.0.experts.down_proj"].shape == (128, 2816, 704)
    assert tensors["model.language_model.layers.0.router.proj.weight"].shape == (128, 2816)
    assert ModelArgs.from_dict(preset_config("26b-a4b")[0]).top_k_experts == 8


def test_cuts_keep_the_layer_pattern_the_shared_block_and_a_full_last_layer():
    cases = {("e2b", 4): ([S, F, S, F], 2), ("e2b", 3): ([S, F, F], 1), ("e2b", 2): ([S, F], 0),
             ("e4b", 12): ([S, S, S, S, S, F, F, S, S, S, S, F], 5), ("31b", 7): ([S, S, S, S, S, F, F], 0)}
    for (shape, layers), (types, shared) in cases.items():
        target, assistant = preset_config(shape, layers=layers, vocab=512)
        args = ModelArgs.from_dict(target)
        assert (args.layer_types, args.num_kv_shared_layers) == (types, shared), (shape, layers)
        drafter = DrafterArgs.from_dict(assistant)
        drafter.validate_against(args)
        assert (args.vocab_size, drafter.text.vocab_size) == (512, 512)
    e2b = DrafterArgs.from_dict(preset_config("e2b", vocab=512)[1])
    assert (e2b.num_centroids, e2b.centroid_intermediate_top_k) == (32, 4)  # 16 tokens per cluster
    for kwargs in ({"layers": 1}, {"layers": 36}, {"vocab": 300}, {"vocab": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            preset_config("e2b", **kwargs)
    with pytest.raises(ValueError, match="experts"):
        preset_config("31b", experts=4)
    with pytest.raises(ValueError, match="not a preset"):
        preset_config("e3b")


@pytest.mark.parametrize("shape", PRESETS)
def test_parameter_counts_of_the_full_size_configs_match_the_spec(shape):
    before = mx.get_active_memory()
    target, assistant = preset_config(shape)
    tensors, drafter = target_tensors(target), drafter_tensors(assistant)
    text, draft = SPEC_PARAMETERS[shape]
    assert parameter_count(tensors) == pytest.approx(text, rel=0.01)
    assert parameter_count(drafter) == pytest.approx(draft, rel=0.01)
    # the MLX modules hold exactly the used tensors (unused shared-layer K/V only in the files)
    modules = (Model(ModelArgs.from_dict(target)), Drafter(DrafterArgs.from_dict(assistant)))
    for module, files in zip(modules, (tensors, drafter)):
        floats = [p for _, p in tree_flatten(module.parameters()) if mx.issubdtype(p.dtype, mx.floating)]
        assert sum(p.size for p in floats) == parameter_count(files)
    unused = parameter_count(tensors, unused=True) - parameter_count(tensors)
    assert (unused > 0) == (shape in ("e2b", "e4b"))
    assert mx.get_active_memory() - before < 64 << 20  # shapes only: nothing was allocated


def _check_logits(logits: mx.array) -> None:
    x = np.array(logits.astype(mx.float32)).reshape(-1, logits.shape[-1])
    assert np.isfinite(x).all()
    assert ((x.std(axis=-1) > 1) & (x.std(axis=-1) < 5)).all(), x.std(axis=-1)


@pytest.fixture(scope="module")
def pairs():
    made = {}

    def get(shape, bits):
        if (shape, bits) not in made:
            made.clear()  # one cut at a time in memory
            made[shape, bits] = random_pair(shape, bits=bits, vocab=512, **CUTS[shape])
        return made[shape, bits]

    return get


@pytest.mark.parametrize("shape, bits", CASES)
def test_tiny_cuts_run_a_forward_and_a_drafter_step(shape, bits, pairs):
    if shape == "26b-a4b" and bits == 16 and mx.default_device() == mx.cpu:
        pytest.skip("MLX's CPU gather_mm (SwitchGLU) supports float32 only; bf16 MoE runs on the GPU")
    b = pairs(shape, bits)
    ids = mx.array([[2, 105, 300, 7]])
    n = 4 if bits == 16 else 2  # CPU quantized matmuls are slow
    cache = b.target.make_cache()
    out = b.target.forward(ids[:, :n], cache, rows=n, return_hidden=True, return_shared_kv=True)
    _check_logits(out.logits)
    assert len(set(np.array(mx.argmax(out.logits, axis=-1)).ravel().tolist())) > 1  # context-dependent
    embeds = b.target.model.embed(ids[:, n - 1 : n])
    next_hidden, y = b.drafter(embeds, out.hidden[:, -1:], out.shared_kv, n - 1)
    _, logits_d = b.drafter.candidates(y)
    _check_logits(logits_d)
    assert np.isfinite(np.array(next_hidden.astype(mx.float32))).all()
    assert 0 <= b.drafter.top_token(y).item() < 512
    q_proj = b.target.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) == (bits == 4)
    if bits == 4:  # the converter's mixed recipe: embedding (tied head) at 8 bits
        assert b.config["quantization"]["model.embed_tokens"] == {"group_size": 64, "bits": 8}
        assert q_proj.bits == 4
    else:
        assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(b.target.parameters()))


def test_quantized_pair_is_never_a_full_precision_copy():
    """Tensors are made and quantized one at a time: the peak stays far below the bf16 model's size."""
    shape, kwargs = "e4b", {"layers": 3, "vocab": 512}
    bf16_bytes = 2 * parameter_count(target_tensors(preset_config(shape, **kwargs)[0]))
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    b = random_pair(shape, bits=4, recipe="uniform", draft_bits=4, **kwargs)
    assert mx.get_peak_memory() - start < 0.6 * bf16_bytes
    assert isinstance(b.drafter.model.embed_tokens, nn.QuantizedEmbedding)  # the clustered head gathers rows
    assert 0 <= b.drafter.top_token(mx.ones((1, 1, 256), mx.bfloat16)).item() < 512
    assert "model.embed_tokens" not in b.config["quantization"]  # uniform: no 8-bit overrides


def _greedy(bundle, prompt, k):
    return [r.token for r in stream_generate(bundle, prompt, 8, SamplerConfig(), num_draft_tokens=k)]


def test_hf_checkpoint_loads_and_mtp_equals_plain(tmp_path):
    target_dir, draft_dir = write_hf_checkpoint("e2b", tmp_path, layers=3, vocab=512, seed=3,
                                                max_shard_bytes=20 << 20)
    index = json.loads((target_dir / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert all(n.startswith(("model.language_model.", "model.vision_tower.", "model.embed_vision.",
                             "model.audio_tower.", "model.embed_audio.")) for n in names)
    assert "model.language_model.layers.2.self_attn.k_proj.weight" in names  # unused K/V of a shared layer
    assert json.loads((target_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 106, 50]
    assert json.loads((target_dir / "config.json").read_text())["model_type"] == "gemma4"
    header = safetensors_header(draft_dir / "model.safetensors")
    assert header["masked_embedding.token_ordering"]["dtype"] == "I64"
    assert {h["dtype"] for k, h in header.items() if k != "__metadata__"} == {"I64", "BF16"}

    bundle = load(target_dir, draft=draft_dir)
    assert bundle.generation.eos_token_ids == [1, 106, 50]
    same = random_pair("e2b", layers=3, vocab=512, seed=3)  # the same values, made in memory
    ids = mx.array([[2, 105, 300, 7, 9]])
    assert mx.array_equal(bundle.target(ids), same.target(ids)).item()
    prompt = [2, 105, 300, 7, 9, 11, 40]
    plain = _greedy(bundle, prompt, 0)
    assert len(plain) == 8 or plain[-1] in (1, 106, 50)
    for k in (2, 4):
        assert _greedy(bundle, prompt, k) == plain


def test_hf_checkpoint_of_the_moe_preset_holds_fused_experts(tmp_path):
    target_dir, draft_dir = write_hf_checkpoint("26b-a4b", tmp_path, layers=2, vocab=256, experts=2)
    bundle = load(target_dir, draft=draft_dir)
    same = random_pair("26b-a4b", layers=2, vocab=256, experts=2)
    for module, other in ((bundle.target, same.target), (bundle.drafter, same.drafter)):
        theirs = dict(tree_flatten(other.parameters()))
        for name, p in tree_flatten(module.parameters()):
            assert mx.array_equal(p, theirs[name]).item(), name


def test_cli_writes_a_preset_and_refuses_to_overwrite(tmp_path, capsys):
    argv = ["write", "--shape", "e2b", "--out", str(tmp_path), "--vocab", "256", "--layers"]
    assert main([*argv, "1"]) == 1
    assert "layers=1" in capsys.readouterr().err
    assert main([*argv, "2"]) == 0
    assert (tmp_path / "gemma-4-E2B-it" / "config.json").is_file()
    assert (tmp_path / "gemma-4-E2B-it-assistant" / "model.safetensors").is_file()
    assert main([*argv, "2"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "2", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-4-E2B-it", "gemma-4-E2B-it-assistant"]
    proc = subprocess.run([sys.executable, "-m", "mlx_gemma_mtp.testing.presets", "write", "--help"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "--shape" in proc.stdout and "--layers" in proc.stdout
