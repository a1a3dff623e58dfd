"""Converter (convert/): HF checkpoint written by the test -> convert -> load -> same model.

Float32 round trips are compared with HF transformers (logits <= 1e-4) and MTP greedy == plain greedy;
quantized bundles are checked structurally (config overrides, packed shapes, protected tensors bit-exact,
dequantization error within one quantization step) and by quality (KL / top-1 vs the float32 source). Every
bad input must give a clear error and leave neither the output folder nor a temporary folder behind.

Quality bounds on the tiny random models (hidden 64, group 32; they are far more sensitive than real models: a
bf16 cast alone costs mean KL ~1e-3): 8-bit mean KL < 0.1 and top-1 >= 80%; 4-bit mixed mean KL < 1.5 and
top-1 >= 25%; and the ordering bf16 < 8-bit < 4-bit mixed < 4-bit uniform.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import conftest
import hf_oracle as oracle
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx import nn
from mlx_gemma_mtp.convert import convert, format_report, quality_report

from mlx_gemma_mtp import cli, load, stream_generate
from mlx_gemma_mtp.load import load_safetensors, safetensors_files, safetensors_header
from mlx_gemma_mtp.models.gemma4_text import canonical_key
from mlx_gemma_mtp.models.towers import tower_key

convert_module = sys.modules["mlx_gemma_mtp.convert.convert"]
PROMPT = [2, 17, 45, 99, 3, 201, 64, 12, 150, 33, 7, 88]  # longer than the sliding window (8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(kind, layout) -> sharded HF target + drafter + tokenizer: e2b with towers, and the text-only MoE."""
    made = {}

    def get(kind: str, layout: str) -> Path:
        if (kind, layout) not in made:
            path = tmp_path_factory.mktemp(f"src-{kind}-{layout}")
            conftest.write_pair(path, kind, ordered=kind == "e2b", layout=layout, max_shard_size="30KB")
            made[kind, layout] = path
        return made[kind, layout]

    return get


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """(kind, layout, options) -> converted bundle folder (cached per module)."""
    made = {}

    def get(kind: str, layout: str, **options) -> Path:
        key = (kind, layout, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("bundles") / f"{kind}-{layout}-{len(made)}"
            made[key] = convert(sources(kind, layout), out, **options)
        return made[key]

    return get


def _written(folder: Path) -> dict[str, mx.array]:
    return load_safetensors(safetensors_files(folder))


def _source_weights(src: Path, model) -> dict[str, mx.array]:
    return model.sanitize(load_safetensors(safetensors_files(src), lambda k: canonical_key(k) is not None))


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}.*")) == []


def _greedy(bundle, k: int, n: int = 20) -> tuple[list[int], object]:
    responses = list(stream_generate(bundle, PROMPT, max_tokens=n, num_draft_tokens=k))
    return [r.token for r in responses], responses[-1].draft


# ------------------------------------------------------------------------------------------------------------
# float32 round trips
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,layout", [("e2b", "multimodal"), ("moe", "text"), ("31b", "text")])
def test_round_trip_float32_matches_hf(kind, layout, sources, tmp_path, monkeypatch):
    src = sources(kind, layout)
    read = []
    real = convert_module.load_safetensors
    monkeypatch.setattr(
        convert_module, "load_safetensors", lambda *a, **k: read.extend(w := real(*a, **k)) or w
    )
    out = convert(src, tmp_path / "out", dtype="float32", max_shard_size=64_000)

    source_keys = [k for f in safetensors_files(src) for k in safetensors_header(f)]
    assert any("vision_tower" in k for k in source_keys) == (layout == "multimodal")
    written = _written(out)
    towers = [k for k in written if tower_key(k) is not None]
    assert bool(towers) == (layout == "multimodal") and all(tower_key(k) == k for k in towers)  # mlx-vlm names
    assert len(safetensors_files(src)) > 1 and len(safetensors_files(out)) > 1
    for name in (
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "drafter/config.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert (
        "quantization" not in config
        and config["model_type"] == json.loads((src / "config.json").read_text())["model_type"]
    )
    assert all(canonical_key(k) == k for k in written if k not in towers)  # canonical names

    bundle = load(out)
    ids = PROMPT
    hf = oracle.make_target(kind, seed=0, layout="text")  # write_pair's text weights, whatever the layout
    expected = oracle.target_forward(hf, ids)["logits"][0].numpy()
    got = np.array(bundle.target(mx.array(ids)[None])[0])
    assert np.abs(got - expected).max() <= 1e-4

    plain, _ = _greedy(bundle, 0)
    mtp, stats = _greedy(bundle, 3)
    assert mtp == plain and stats.drafted > 0


def test_python_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_gemma_mtp.convert", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--mlx-path" in r.stdout and "--draft-q-bits" in r.stdout


# ------------------------------------------------------------------------------------------------------------
# quantization
# ------------------------------------------------------------------------------------------------------------


def test_quantized_quality_bounds(converted, sources):
    src = sources("e2b", "multimodal")
    reports = {}
    for name, options in [
        ("bf16", {}),
        ("q8", dict(q_bits=8)),
        ("q4", dict(q_bits=4)),
        ("q4u", dict(q_bits=4, recipe="uniform")),
    ]:
        quant = dict(quantize=True, q_group_size=32, **options) if options else {}
        out = converted("e2b", "multimodal", **quant)
        reports[name] = quality_report(out, src, max_tokens=8)
        assert json.loads((out / "quality_report.json").read_text())["mean_kl"] == reports[name]["mean_kl"]
        assert reports[name]["acceptance"]["drafted"] > 0
    kl = {k: r["mean_kl"] for k, r in reports.items()}
    assert kl["bf16"] < kl["q8"] < kl["q4"] < kl["q4u"], kl
    assert kl["q8"] < 0.1 and reports["q8"]["top1_agreement"] >= 0.8
    assert kl["q4"] < 1.5 and reports["q4"]["top1_agreement"] >= 0.25
    table = format_report(reports["q4"])
    assert "mean KL" in table and "4-bit, group 32" in table and "acceptance" in table
    # the towers stay in bfloat16 whatever the text model's quantization: close to float32, the same everywhere
    towers = {name: r["towers"] for name, r in reports.items()}
    assert set(towers["q4"]) == {"image", "audio"} and towers["q4"] == towers["bf16"], towers
    assert all(t["relative_error"] < 0.02 and t["cosine"] > 0.999 for t in towers["bf16"].values()), towers
    assert "image tower vs float32" in table


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bundle_runs_and_dequantizes_within_one_step(bits, converted, sources):
    src = sources("moe", "text")
    out = converted("moe", "text", quantize=True, q_bits=bits, q_group_size=32, dtype="float32")
    bundle = load(out)
    source = _source_weights(src, bundle.target)
    n_quantized = 0
    for path, m in bundle.target.named_modules():
        if (
            isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            or type(m).__name__ == "QuantizedSwitchLinear"
        ):
            n_quantized += 1
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            err = mx.abs(w - source[f"{path}.weight"]).reshape(*m.scales.shape, -1).max(axis=-1)
            assert mx.all(err <= mx.abs(m.scales) * 1.001 + 1e-6).item(), path
    assert n_quantized > 20
    # the embedding scale sqrt(H) is applied outside the quantized gather: embeddings stay close
    ref = load(src, dtype=mx.float32).target.model
    e_q, e_ref = bundle.target.model.embed(mx.array(PROMPT)), ref.embed(mx.array(PROMPT))
    rel = (mx.linalg.norm(e_q - e_ref) / mx.linalg.norm(e_ref)).item()
    assert rel < (0.01 if bits == 8 else 0.15)
    plain, _ = _greedy(bundle, 0)
    mtp, stats = _greedy(bundle, 3)
    assert mtp == plain and stats.drafted > 0


PROTECTED_LEAVES = {"layer_scalar", "scale", "per_expert_scale", "token_ordering"}


@pytest.mark.parametrize("kind,layout", [("e2b", "multimodal"), ("moe", "text")])
def test_protected_tensors_bit_exact(kind, layout, converted, sources):
    """Norms, layer_scalar, router scales and token_ordering: never quantized, never rounded (bf16 output)."""
    src = sources(kind, layout)
    out = converted(kind, layout, quantize=True, q_bits=4, q_group_size=32, draft_q_bits=4)
    bundle = load(out)
    modules = dict(bundle.target.named_modules())
    written, source = _written(out), _source_weights(src, bundle.target)
    towers = {k for k in written if tower_key(k) is not None}
    assert bool(towers) == (layout == "multimodal")
    assert not any(k.endswith(".scales") for k in towers)  # the towers are never quantized
    protected = [
        k
        for k in written.keys() - towers
        if not hasattr(modules[k.rsplit(".", 1)[0]], "to_quantized")
        and not isinstance(modules[k.rsplit(".", 1)[0]], (nn.QuantizedLinear, nn.QuantizedEmbedding))
        and "switch_glu" not in k
    ]
    assert protected and all(
        "norm" in k.rsplit(".", 2)[-2] or k.rsplit(".", 1)[1] in PROTECTED_LEAVES for k in protected
    ), protected
    for k in protected:
        assert written[k].dtype == mx.float32 and mx.array_equal(written[k], source[k]).item(), k
    if kind == "moe":
        assert {"model.layers.0.router.scale", "model.layers.0.router.per_expert_scale"} <= set(protected)
    # weights of Linear/Embedding did get the output dtype
    assert written["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    drafter = _written(out / "drafter")
    if kind == "e2b":
        ordering = load_safetensors(safetensors_files(src / "drafter"))["masked_embedding.token_ordering"]
        assert drafter["masked_embedding.token_ordering"].dtype in (mx.int32, mx.int64)
        assert mx.array_equal(drafter["masked_embedding.token_ordering"], ordering).item()


def _mixed_expectation(kind: str) -> dict[str, int]:
    """Module path -> bits of the mixed recipe at q_bits=4, group 32, for the tiny configs (hidden 64)."""
    if (
        kind == "e2b"
    ):  # 8 layers; the last is KV-shared (no k/v_proj); per_layer_projection (in 8) stays float
        high = [
            "model.embed_tokens",
            "model.embed_tokens_per_layer",
            "model.per_layer_model_projection",
            "model.layers.0.self_attn.v_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.7.mlp.down_proj",
        ]
        high += [f"model.layers.{i}.per_layer_input_gate" for i in range(8)]
        return {p: 8 for p in high} | {
            "model.layers.3.self_attn.q_proj": 4,
            "model.layers.7.mlp.gate_proj": 4,
        }
    # moe: 6 layers, layer 5 is a k_eq_v full layer (k_proj at 8 bits); routers 8; experts' down (in 16) float
    high = [
        "model.embed_tokens",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.5.self_attn.k_proj",
        "model.layers.5.mlp.down_proj",
    ]
    high += [f"model.layers.{i}.router.proj" for i in range(6)]
    return {p: 8 for p in high} | {"model.layers.2.experts.switch_glu.gate_proj": 4}


@pytest.mark.parametrize("kind,layout", [("e2b", "multimodal"), ("moe", "text")])
def test_mixed_recipe_writes_real_8_bit_tensors(kind, layout, converted):
    out = converted(kind, layout, quantize=True, q_bits=4, q_group_size=32)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 32, "affine")
    overrides = {p: v["bits"] for p, v in q.items() if isinstance(v, dict)}
    expected = _mixed_expectation(kind)
    assert overrides == {p: b for p, b in expected.items() if b != 4}
    written = _written(out)
    for path, bits in expected.items():
        in_dim = written[f"{path}.scales"].shape[-1] * 32
        assert written[f"{path}.weight"].dtype == mx.uint32
        assert written[f"{path}.weight"].shape[-1] == in_dim * bits // 32, path
    floats = (
        ["model.layers.0.per_layer_projection"]
        if kind == "e2b"
        else ["model.layers.0.experts.switch_glu.down_proj"]
    )
    for path in floats:  # input dim (8 / 16) not divisible by the group size
        assert f"{path}.scales" not in written and written[f"{path}.weight"].dtype == mx.bfloat16
    bundle = load(out)
    modules = dict(bundle.target.named_modules())
    assert all(modules[p].bits == b for p, b in expected.items())


def test_quantized_drafter_gathers_dequantized_rows(converted, sources):
    out = converted("e2b", "multimodal", quantize=True, q_bits=8, q_group_size=32, draft_q_bits=4)
    assert json.loads((out / "drafter/config.json").read_text())["quantization"]["bits"] == 4
    bundle = load(out)
    d = bundle.drafter
    assert isinstance(d.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(d.pre_projection, nn.QuantizedLinear)
    assert type(d.masked_embedding.centroids) is nn.Linear  # cluster choice stays float
    e = d.model.embed_tokens
    table = mx.dequantize(e.weight, e.scales, e.biases, e.group_size, e.bits)  # (V, Hd)
    y = mx.random.normal((1, 2, d.args.text.hidden_size), key=mx.random.key(0))
    ids, logits = d.masked_embedding.candidates(y, e)
    expected = (table[ids] @ y[..., None]).squeeze(-1)
    assert mx.allclose(logits, expected, atol=1e-4).item()
    plain, _ = _greedy(bundle, 0)
    mtp, stats = _greedy(bundle, 3)
    assert mtp == plain and stats.drafted > 0


def test_towers_round_trip_and_text_only_drops_them(sources, tmp_path, monkeypatch):
    """A converted multimodal bundle answers an image and an audio clip as its source does (float32: the same
    logits); `text_only` reads no tower tensor and writes a config that declares none."""
    from test_multimodal import PROCESSOR, TEMPLATE, audio, chat, image

    from mlx_gemma_mtp.decode import encode_prompt
    from mlx_gemma_mtp.media.encoder import PromptMedia
    from mlx_gemma_mtp.testing.tokenizer import write_gemma4_tokenizer

    src = tmp_path / "src"
    shutil.copytree(sources("e2b", "multimodal"), src)
    write_gemma4_tokenizer(src, 256, TEMPLATE, media=oracle.MEDIA_TOKENS)  # one that renders media parts
    (src / "processor_config.json").write_text(json.dumps(PROCESSOR))
    out = convert(src, tmp_path / "out", dtype="float32")
    assert (out / "processor_config.json").is_file()
    prompt = chat(image(), audio())
    logits = []
    for bundle in (load(src, dtype=mx.float32), load(out)):
        encoded = encode_prompt(bundle, prompt, None)
        rows = PromptMedia(encoded, bundle.media).rows(0, len(encoded))
        n = len(encoded)
        logits.append(bundle.target.forward(mx.array(encoded.ids)[None], bundle.target.make_cache(), rows=n,
                                            media=rows).logits)
    assert mx.array_equal(*logits).item()

    # mlx-vlm / mlx-community multimodal layout: `language_model.model.*`, towers at the root, one file
    community = tmp_path / "mlx-community-gemma-4-e2b"
    shutil.copytree(out, community)
    for f in [*community.glob("*.safetensors"), community / "model.safetensors.index.json"]:
        f.unlink()
    weights = {(k if tower_key(k) is not None else f"language_model.{k}"): v for k, v in _written(out).items()}
    mx.save_safetensors(str(community / "model.safetensors"), weights, metadata={"format": "mlx"})
    bundle = load(community)
    encoded = encode_prompt(bundle, prompt, None)
    rows = PromptMedia(encoded, bundle.media).rows(0, len(encoded))
    theirs = bundle.target.forward(mx.array(encoded.ids)[None], bundle.target.make_cache(), rows=len(encoded),
                                   media=rows).logits
    assert mx.array_equal(theirs, logits[1]).item()

    read = []
    real = convert_module.load_safetensors
    monkeypatch.setattr(
        convert_module, "load_safetensors", lambda *a, **k: read.extend(w := real(*a, **k)) or w
    )
    text = convert(src, tmp_path / "text", dtype="float32", text_only=True)
    assert read and not any(tower_key(k) is not None for k in read)
    assert not any(tower_key(k) is not None for k in _written(text))
    assert "vision_config" not in json.loads((text / "config.json").read_text()) and load(text).media is None


def test_mlx_community_layout_loads_and_matches(converted, tmp_path):
    """mlx-vlm style: `language_model.model.*` keys, prefixed per-path quantization, a tower, one file."""
    out = converted("moe", "text", quantize=True, q_bits=4, q_group_size=32)
    fake = tmp_path / "mlx-community-gemma-4-tiny-4bit"
    fake.mkdir()
    weights = {f"language_model.{k}": v for k, v in _written(out).items()}
    weights["vision_tower.encoder.layers.0.mlp.fc1.weight"] = mx.zeros((4, 4))
    mx.save_safetensors(str(fake / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((out / "config.json").read_text())
    quant = {
        (f"language_model.{k}" if isinstance(v, dict) else k): v
        for k, v in config.pop("quantization").items()
    }
    config.pop("quantization_config")
    assert any(k.startswith("language_model.model.layers.") and "experts" not in k for k in quant)
    assert all(k.startswith("language_model.model.layers.") for k in weights if "switch_glu" in k)
    mm = {"model_type": "gemma4", "text_config": config, "quantization": quant, "vision_config": {}}
    (fake / "config.json").write_text(json.dumps(mm))
    shutil.copytree(out / "drafter", fake / "drafter")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(out / name, fake / name)

    ours, theirs = load(out), load(fake)
    assert isinstance(theirs.target.model.layers[0].router.proj, nn.QuantizedLinear)
    assert theirs.target.model.layers[0].router.proj.bits == 8
    x = mx.array(PROMPT)[None]
    assert mx.array_equal(ours.target(x), theirs.target(x)).item()
    assert _greedy(ours, 3)[0] == _greedy(theirs, 3)[0]


# ------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors, nothing left behind
# ------------------------------------------------------------------------------------------------------------


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _first_shard(src: Path) -> Path:
    return safetensors_files(src)[0]


def _truncate(src):
    f = _first_shard(src)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(src):
    f = _first_shard(src)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + f.read_bytes()[24:])


def _escape_index(src):
    def edit(index):
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = "../elsewhere.safetensors"

    _edit_json(src / "model.safetensors.index.json", edit)


BAD_INPUTS = {
    "missing source": (
        lambda src: {"hf_path": src.parent / "does-not-exist"},
        FileNotFoundError,
        "no such folder",
    ),
    "not gemma 4": (
        lambda src: _edit_json(src / "config.json", lambda c: c.update(model_type="llama")),
        ValueError,
        "not a Gemma 4",
    ),
    "drafter as target": (lambda src: {"hf_path": src / "drafter"}, ValueError, "drafter"),
    "drafter mismatch": (
        lambda src: _edit_json(src / "drafter/config.json", lambda c: c.update(backbone_hidden_size=32)),
        ValueError,
        "drafter does not match the target",
    ),
    "truncated shard": (_truncate, ValueError, "truncated"),
    "corrupt header": (_corrupt_header, ValueError, "corrupt safetensors header"),
    "missing shard": (lambda src: _first_shard(src).unlink(), FileNotFoundError, "names shard .* missing"),
    "index escapes": (_escape_index, ValueError, "outside the checkpoint folder"),
    "weights vs config": (
        lambda src: _edit_json(src / "config.json", lambda c: c.update(intermediate_size=128)),
        ValueError,
        "do not match config.json.*wrong shape",
    ),
    "bits": (lambda src: {"quantize": True, "q_bits": 7}, ValueError, "q_bits=7"),
    "group size": (lambda src: {"quantize": True, "q_group_size": 48}, ValueError, "q_group_size=48"),
    "recipe": (lambda src: {"recipe": "fancy"}, ValueError, "recipe='fancy'"),
    "dtype": (lambda src: {"dtype": "int8"}, ValueError, "dtype='int8'"),
    "draft bits without drafter": (
        lambda src: shutil.rmtree(src / "drafter") or {"draft_q_bits": 4},
        ValueError,
        "no drafter/",
    ),
}


@pytest.fixture
def fresh_src(sources, tmp_path):
    """A private copy of the small e2b source (text layout), safe to damage."""
    src = tmp_path / "src"
    shutil.copytree(sources("e2b", "text"), src)
    return src


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_clear_error_and_nothing_left(case, fresh_src, tmp_path):
    damage, error, message = BAD_INPUTS[case]
    kwargs = {"hf_path": fresh_src, "mlx_path": tmp_path / "out"} | (damage(fresh_src) or {})
    with pytest.raises(error, match=message):
        convert(**kwargs)
    _no_leftovers(tmp_path / "out")


def test_refuses_existing_output_and_source_overwrite(fresh_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists; pass --force"):
        convert(fresh_src, out)
    assert (out / "keep.txt").read_text() == "mine" and list(tmp_path.glob(".out.*")) == []
    with pytest.raises(ValueError, match="would overwrite the source"):
        convert(fresh_src, fresh_src, force=True)
    with pytest.raises(ValueError, match="would overwrite the source"):
        convert(fresh_src, tmp_path, force=True)
    assert (fresh_src / "config.json").is_file()


def test_already_quantized_source_is_refused(converted, tmp_path):
    bundle = converted("moe", "text", quantize=True, q_bits=4, q_group_size=32)
    with pytest.raises(ValueError, match="already quantized"):
        convert(bundle, tmp_path / "again")
    _no_leftovers(tmp_path / "again")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_conversion_leaves_nothing(exc, fresh_src, tmp_path, monkeypatch):
    """A failure after some shards were written (Ctrl-C, disk) removes the temp folder; keeps old bundle."""
    real, calls = convert_module.transform, []

    def failing_transform(*args):
        calls.append(args[0])
        if len(calls) == 40:
            raise exc("interrupted")
        return real(*args)

    monkeypatch.setattr(convert_module, "transform", failing_transform)
    with pytest.raises(exc):
        convert(fresh_src, tmp_path / "out", max_shard_size=10_000)
    assert len(calls) == 40
    _no_leftovers(tmp_path / "out")
    monkeypatch.undo()
    old = convert(fresh_src, tmp_path / "out")
    calls.clear()
    monkeypatch.setattr(convert_module, "transform", failing_transform)
    with pytest.raises(exc):
        convert(fresh_src, old, force=True, quantize=True, q_group_size=32, max_shard_size=10_000)
    assert (
        "quantization" not in json.loads((old / "config.json").read_text()) and load(old).target is not None
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_force_replaces(fresh_src, tmp_path):
    out = convert(fresh_src, tmp_path / "out")
    (out / "stale.txt").write_text("from the first run")
    convert(fresh_src, out, force=True, quantize=True, q_bits=8, q_group_size=32)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert load(out).drafter is not None


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def test_cli_convert_report_and_eval_quant(fresh_src, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "convert",
        "--hf-path",
        str(fresh_src),
        "--mlx-path",
        str(out),
        "-q",
        "--q-bits",
        "8",
        "--q-group-size",
        "32",
        "--recipe",
        "uniform",
        "--draft-q-bits",
        "8",
        "--dtype",
        "float16",
        "--report",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean KL" in printed and "top-1" in printed and (out / "quality_report.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and load(out).target.model.layers[0].mlp.down_proj.bits == 8
    (out / "quality_report.json").unlink()
    assert (
        cli.main(["eval-quant", "--model", str(out), "--reference", str(fresh_src), "--max-tokens", "4"]) == 0
    )
    assert "acceptance" in capsys.readouterr().out and (out / "quality_report.json").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--q-bits", "7"], "q_bits=7"),
        (["--mlx-path-exists"], "already exists"),
        (["--missing-source"], "no such folder"),
    ],
)
def test_cli_errors_exit_1(argv, message, fresh_src, tmp_path, capsys):
    out, src = tmp_path / "out", fresh_src
    if argv == ["--mlx-path-exists"]:
        out.mkdir()
        argv = []
    if argv == ["--missing-source"]:
        src, argv = tmp_path / "nope", []
    assert cli.main(["convert", "--hf-path", str(src), "--mlx-path", str(out), "-q", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert convert_module.main(["--hf-path", str(src), "--mlx-path", str(out), "-q", *argv]) == 1


def test_hf_reference_agrees_with_float32_source(sources):
    """Sanity of the reference side of the report: the float32 source loaded by `load` matches HF."""
    src = sources("e2b", "multimodal")
    model = oracle.load_target(str(src), layout="multimodal")
    expected = oracle.target_forward(model, PROMPT)["logits"][0]
    got = load(src, dtype=mx.float32).target(mx.array(PROMPT)[None])[0]
    assert torch.allclose(torch.from_numpy(np.array(got)), expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# config and weight validation (the loader's checks, with the converter's no-leftovers guarantee)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, edit, message",
    [
        ("config.json", lambda c: c.update(sliding_window=0), r"config\.json: sliding_window=0 must be a"),
        ("config.json", lambda c: c.update(num_key_value_heads="1"), r"num_key_value_heads='1' must be a"),
        (
            "drafter/config.json",
            lambda c: c["text_config"].update(num_key_value_heads=0),
            r"drafter/config\.json: text_config\.num_key_value_heads=0 must be a positive integer",
        ),
    ],
    ids=["sliding_window", "string", "drafter"],
)
def test_bad_config_value_named_and_nothing_left(config, edit, message, fresh_src, tmp_path):
    _edit_json(fresh_src / config, edit)
    with pytest.raises(ValueError, match=message):
        convert(fresh_src, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_integer_weight_where_floats_belong_is_refused(fresh_src, tmp_path):
    """Before: converted (the cast kept the integers) into a bundle that computes garbage."""
    shard = _first_shard(fresh_src)
    weights = mx.load(str(shard))
    name = next(k for k in sorted(weights) if weights[k].ndim == 2)  # a Linear or Embedding weight
    weights[name] = weights[name].astype(mx.int32)
    mx.save_safetensors(str(shard), weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{shard.name}: tensor {name} is stored as I32, but .* floating"):
        convert(fresh_src, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


# ------------------------------------------------------------------------------------------------------------
# killed conversions: SIGTERM cleans up like Ctrl-C; SIGKILL's leftovers are removed by the next run
# ------------------------------------------------------------------------------------------------------------

# Runs a real conversion that pauses (deterministically, not by timing) after some shards were written: the
# test signals it while it is paused.
PAUSED_CONVERSION = """
import sys, time
from pathlib import Path
import mlx_gemma_mtp.convert
module = sys.modules["mlx_gemma_mtp.convert.convert"]
real, calls = module.transform, []
def paused(*args):
    calls.append(args[0])
    if len(calls) == 40:
        Path(sys.argv[3]).write_text("paused")
        time.sleep(300)
    return real(*args)
module.transform = paused
module.convert(sys.argv[1], sys.argv[2], max_shard_size=10_000)
"""


@pytest.fixture
def paused_conversion(tmp_path):
    """(src, out) -> (process, its temporary folder), once the process is paused mid-conversion."""
    procs = []

    def start(src: Path, out: Path) -> tuple[subprocess.Popen, Path]:
        ready = tmp_path / "paused"
        proc = subprocess.Popen(
            [sys.executable, "-c", PAUSED_CONVERSION, str(src), str(out), str(ready)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + 180
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the conversion never paused (exit {proc.wait()}): {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        (tmp,) = out.parent.glob(f".{out.name}.tmp-*")
        assert list(tmp.glob("part-*")), "nothing written yet: the test would prove nothing"
        return proc, tmp

    yield start
    for proc in procs:  # a failed test leaves no sleeping process behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_mid_conversion_leaves_nothing(fresh_src, tmp_path, paused_conversion):
    out = tmp_path / "out"
    proc, tmp = paused_conversion(fresh_src, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    _no_leftovers(out)


def test_sigkill_leftovers_removed_by_the_next_conversion(fresh_src, tmp_path, capsys, paused_conversion):
    out = tmp_path / "out"
    proc, tmp = paused_conversion(fresh_src, out)
    proc.kill()
    proc.communicate(timeout=120)  # reaped: a zombie would still count as alive
    assert tmp.is_dir() and json.loads((tmp / convert_module.OWNER_FILE).read_text())["pid"] == proc.pid
    convert(fresh_src, out)
    assert not tmp.exists() and load(out).drafter is not None
    err = capsys.readouterr().err
    assert f"removed {tmp}, left behind by an interrupted conversion (process {proc.pid} has ended)" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def _fake_temp(out: Path, suffix: str, owner) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{suffix}"
    (tmp / "drafter").mkdir(parents=True)
    (tmp / "part-00001.spill").write_bytes(b"x" * 100)
    if owner is not None:
        (tmp / convert_module.OWNER_FILE).write_text(json.dumps(owner))
    return tmp


def test_only_temp_folders_of_dead_runs_are_removed(fresh_src, tmp_path, capsys):
    out, host = tmp_path / "out", socket.gethostname()
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    dead = _fake_temp(out, "dead", {"pid": ended.pid, "host": host})
    kept = [
        _fake_temp(out, "live", {"pid": os.getpid(), "host": host}),  # a concurrent conversion
        _fake_temp(out, "other-host", {"pid": ended.pid, "host": host + ".elsewhere"}),
        _fake_temp(out, "no-marker", None),  # a run that has only just created its folder
        _fake_temp(out, "bad-marker", ["not", "an", "owner"]),
        _fake_temp(tmp_path / "out2", "dead", {"pid": ended.pid, "host": host}),  # another destination
    ]
    convert(fresh_src, out)
    assert not dead.exists() and all(p.is_dir() for p in kept)
    err = capsys.readouterr().err
    assert f"removed {dead}, left behind by an interrupted conversion (process {ended.pid} has ended)" in err
    assert err.count("left behind by an interrupted conversion") == 1


def test_sigterm_handler_only_while_converting(fresh_src, tmp_path):
    """Installed in the main thread for the conversion only, then the previous one is back; an application's
    own handler is respected, and a conversion on another thread leaves signals alone."""
    seen = []
    real = convert_module.write_part
    convert_module.write_part = lambda *a: seen.append(signal.getsignal(signal.SIGTERM)) or real(*a)
    try:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        convert(fresh_src, tmp_path / "a")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert callable(seen[-1]) and seen[-1] is not signal.SIG_DFL

        def own(signum, frame):
            pass

        previous = signal.signal(signal.SIGTERM, own)
        try:
            convert(fresh_src, tmp_path / "b")
            assert seen[-1] is own and signal.getsignal(signal.SIGTERM) is own
        finally:
            signal.signal(signal.SIGTERM, previous)
        worker = threading.Thread(target=convert, args=(fresh_src, tmp_path / "c"))
        worker.start()
        worker.join()
        assert seen[-1] == signal.SIG_DFL and (tmp_path / "c" / "config.json").is_file()
    finally:
        convert_module.write_part = real


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_output_permissions_follow_the_umask(umask, fresh_src, tmp_path):
    """Before: the bundle folder kept mkdtemp's 0700 whatever the umask."""
    previous = os.umask(umask)
    try:
        out = convert(fresh_src, tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "drafter").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o666 & ~umask
    assert not (out / convert_module.OWNER_FILE).exists()


# ------------------------------------------------------------------------------------------------------------
# memory at real size: row-sliced huge tensors, shards written once, a layer-streamed report reference
# ------------------------------------------------------------------------------------------------------------

shards_module = sys.modules["mlx_gemma_mtp.convert.shards"]
report_module = sys.modules["mlx_gemma_mtp.convert.report"]
reference_module = sys.modules["mlx_gemma_mtp.convert.reference"]


@pytest.mark.parametrize("options", [{}, dict(quantize=True, q_bits=4, q_group_size=32)], ids=["bf16", "q4"])
def test_huge_tensors_convert_in_row_slices_to_the_same_bundle(options, sources, tmp_path, monkeypatch):
    """With a tiny SLICE_BYTES every big table (embedding, PLE) goes through the row-sliced path: same bytes."""
    src = sources("e2b", "multimodal")
    whole = convert(src, tmp_path / "whole", **options)
    sliced_names, real_read_rows = [], convert_module.read_rows

    def read_rows(file, info, start, stop, offset=None):
        sliced_names.append(info["shape"])
        return real_read_rows(file, info, start, stop, offset)

    monkeypatch.setattr(convert_module, "SLICE_BYTES", 4096)
    monkeypatch.setattr(convert_module, "read_rows", read_rows)
    sliced = convert(src, tmp_path / "sliced", max_shard_size=50_000, **options)
    assert len(sliced_names) > 10, "nothing went through the sliced path"
    for part in ("", "drafter"):
        a, b = _written(whole / part), _written(sliced / part)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    assert load(sliced).target is not None


def test_each_shard_is_written_once(fresh_src, tmp_path, monkeypatch):
    """Every byte of every shard is written once (header slot filled at close, no spill file copied), and no
    other file is written into the bundle's weight folders."""
    written: dict[str, int] = {}
    opened: list[str] = []

    class Counting:
        def __init__(self, path, mode):
            self.f, self.name = open(path, mode), Path(path).name  # noqa: SIM115 - closed by close()
            opened.append(self.name)
            written.setdefault(self.name, 0)

        def write(self, data):
            n = self.f.write(data)
            written[self.name] += n
            return n

        def seek(self, *args):
            return self.f.seek(*args)

        def close(self):
            self.f.close()

    monkeypatch.setattr(shards_module, "open", Counting, raising=False)
    out = convert(fresh_src, tmp_path / "out", quantize=True, q_group_size=32, max_shard_size=20_000)
    shards = sorted(out.glob("model-*.safetensors")) + sorted((out / "drafter").glob("model-*.safetensors"))
    assert len(shards) > 3 and len(opened) == len(shards) and len(set(opened)) < len(opened)  # part names restart in drafter/
    assert all(name.startswith("part-") and name.endswith(".safetensors") for name in opened)
    assert sum(written.values()) == sum(s.stat().st_size for s in shards)  # no byte written twice
    assert not list(out.rglob("*.spill"))
    for shard in shards:  # the space-padded header slot is valid safetensors for every reader
        header = safetensors_header(shard)
        assert mx.load(str(shard)).keys() == header.keys() - {"__metadata__"}


@pytest.mark.parametrize("kind,layout", [("e2b", "multimodal"), ("moe", "text"), ("31b", "text")])
def test_layer_streamed_reference_equals_the_float32_model(kind, layout, sources, monkeypatch):
    """The report's reference, computed one layer at a time with the head in vocabulary slices, gives the
    logits of the whole source loaded in float32."""
    src = sources(kind, layout)
    monkeypatch.setattr(reference_module, "HEAD_SLICE_BYTES", 4 * 64 * 100)  # ~100 rows per slice
    full = load(src, dtype=mx.float32).target
    prompts = [PROMPT, PROMPT[3:] + [5, 6, 7]]
    for ids, logits in zip(prompts, reference_module.reference_logits(src, prompts)):
        want = np.array(full(mx.array(ids)[None])[0])
        np.testing.assert_allclose(np.array(logits), want, atol=1e-5, rtol=1e-5)


def test_report_numbers_equal_the_two_model_computation(converted, sources, monkeypatch):
    """KL / top-1 as before (both models whole in memory), but the reference is never loaded whole: with
    REFERENCE_IN_MEMORY_BYTES at 0 only the bundle is loaded, and the reference acceptance is skipped."""
    src = sources("e2b", "multimodal")
    out = converted("e2b", "multimodal", quantize=True, q_group_size=32)
    bundle, ref = load(out), load(src, dtype=mx.float32)
    kl, agree = [], []
    for ids in report_module.prompt_ids(bundle.tokenizer, bundle.target.args.vocab_size):
        x = mx.array(ids)[None]
        log_q = bundle.target(x)[0] - mx.logsumexp(bundle.target(x)[0], axis=-1, keepdims=True)
        log_p = ref.target(x)[0] - mx.logsumexp(ref.target(x)[0], axis=-1, keepdims=True)
        kl.append((mx.exp(log_p) * (log_p - log_q)).sum(axis=-1))
        agree.append(mx.argmax(log_q, axis=-1) == mx.argmax(log_p, axis=-1))
    loads = []
    real_load = report_module.load
    monkeypatch.setattr(report_module, "load", lambda path, **kw: loads.append((path, kw)) or real_load(path, **kw))
    monkeypatch.setattr(report_module, "REFERENCE_IN_MEMORY_BYTES", 0)
    report = quality_report(out, src, max_tokens=4)
    assert report["mean_kl"] == pytest.approx(mx.concatenate(kl).mean().item(), rel=1e-5)
    assert report["max_kl"] == pytest.approx(mx.concatenate(kl).max().item(), rel=1e-5)
    assert report["top1_agreement"] == pytest.approx(mx.concatenate(agree).astype(mx.float32).mean().item())
    assert [kw for _, kw in loads] == [{}] and report["reference_acceptance"] is None
    assert report["acceptance"]["drafted"] > 0
    few = quality_report(out, src, max_tokens=0, num_prompts=2, prompt_tokens=5)
    assert few["positions"] == 10 and few["acceptance"] is None and "acceptance" not in format_report(few)
    with pytest.raises(ValueError, match="num_prompts=9"):
        quality_report(out, src, num_prompts=9)
