"""Self-checks of the HF oracle (tests/hf_oracle.py): tiny configs, weight perturbation, KV-sharing patch,
checkpoint layouts and the assisted-generation hooks.  Pure torch/transformers; well under a minute."""

import json
import os

import hf_oracle as O
import pytest
import torch
from safetensors import safe_open

S, F = O.S, O.F
PROMPT_LEN = 24  # > sliding_window (8): exercises the window in prefill and decoding


def _prompt(seed: int = 5, n: int = PROMPT_LEN) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _checkpoint_keys(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            return sorted(json.load(fh)["weight_map"])
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as fh:
        return sorted(fh.keys())


@pytest.fixture(scope="module")
def targets():
    return {kind: O.make_target(kind, seed=0) for kind in O.TARGET_KINDS}


# ------------------------------------------------------------------------------------------------------------
# configs and weights
# ------------------------------------------------------------------------------------------------------------

EXPECTED_PRODUCERS = {"e2b": (3, 4), "e4b": (4, 5), "31b": (4, 5), "moe": (4, 5)}  # (sliding, full) "store"


@pytest.mark.parametrize("kind", O.TARGET_KINDS)
def test_target_config(kind, targets):
    cfg = targets[kind].config
    raw = O.target_config_dict(kind)
    assert cfg.layer_types == raw["layer_types"] and cfg.layer_types[-1] == F
    assert (cfg.vocab_size, cfg.hidden_size, cfg.sliding_window) == (256, 64, 8)
    assert cfg.final_logit_softcapping == 30.0
    attns = [layer.self_attn for layer in targets[kind].model.layers]  # modes are fixed at construction
    sliding, full = EXPECTED_PRODUCERS[kind]
    assert [i for i, a in enumerate(attns) if a.store_full_length_kv] == [sliding, full]
    assert sum(a.is_kv_shared_layer for a in attns) == cfg.num_kv_shared_layers
    full_layer = cfg.per_layer_config[full]
    assert full_layer.head_dim == 32 and cfg.per_layer_config[sliding].head_dim == 16
    assert full_layer.num_key_value_heads == (1 if cfg.attention_k_eq_v else cfg.num_key_value_heads)
    attn = targets[kind].model.layers[full].self_attn
    assert (attn.v_proj is None) == cfg.attention_k_eq_v
    if kind == "e2b":  # double-wide MLP only on the KV-shared layers
        widths = [layer.mlp.gate_proj.out_features for layer in targets[kind].model.layers]
        assert widths == [96] * 5 + [192] * 3


@pytest.mark.parametrize("kind", O.TARGET_KINDS)
def test_greedy_depends_on_context(kind, targets):
    tokens = O.greedy_generate(targets[kind], _prompt(), 48)
    assert len(tokens) == 48 and len(set(tokens)) >= 10
    with torch.no_grad():
        out = targets[kind](torch.tensor([_prompt() + tokens]), output_hidden_states=True)
        raw = targets[kind].lm_head(out.hidden_states[-1])
    # softcapping matters (far above fp32 noise) but does not saturate
    assert out.logits.abs().max() < 15.0 and (raw - out.logits).abs().max() > 1e-3


def test_perturbation_is_deterministic_and_applied(targets):
    again = O.make_target("moe", seed=0)
    for (name, a), b in zip(targets["moe"].state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    layer = again.model.layers[0]
    scalars = torch.cat([lay.layer_scalar for lay in again.model.layers])
    for t in (scalars, layer.input_layernorm.weight, layer.router.scale, layer.router.per_expert_scale):
        assert t.min() >= 0.5 and t.max() <= 1.5 and t.std() > 0.05
    q_norm = layer.self_attn.q_norm.weight * 16**0.25  # q/k norms also absorb the missing 1/sqrt(d)
    assert q_norm.min() >= 0.5 and q_norm.max() <= 1.5
    other = O.make_target("moe", seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, again.model.embed_tokens.weight)


def test_kv_sharing_patch():
    assistant_text = O.assistant_config_dict(O.target_config_dict("31b"), False)["text_config"]
    target_31b = O.target_config_dict("31b")
    assert O.Gemma4TextConfig.kv_sharing_modes is O.HF_KV_SHARING_MODES  # the patch is scoped
    with pytest.raises(ValueError):  # spec §9.1: HF cannot build any assistant
        _ = O.Gemma4TextConfig(**assistant_text).kv_sharing_modes
    assert O.Gemma4TextConfig(**target_31b).kv_sharing_modes == [None] * 6  # §9.2: no "store" layer
    with O.patch_kv_sharing_modes():
        with O.patch_kv_sharing_modes():  # re-entrant
            assert O.Gemma4TextConfig(**assistant_text).kv_sharing_modes == ["reuse"] * 4
        assert O.Gemma4TextConfig(**target_31b).kv_sharing_modes == [None] * 4 + ["store"] * 2
    assert O.Gemma4TextConfig.kv_sharing_modes is O.HF_KV_SHARING_MODES


# ------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------


def test_save_target_sharded_and_reload(tmp_path, targets):
    O.save_target(targets["31b"], str(tmp_path))
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    with open(tmp_path / "config.json") as fh:
        cfg = json.load(fh)
    assert cfg["global_head_dim"] == 32 and cfg["num_global_key_value_heads"] == 1
    assert "per_layer_config" not in cfg
    with open(tmp_path / "generation_config.json") as fh:
        assert json.load(fh)["eos_token_id"] == [1, 106]
    reloaded = O.load_target(str(tmp_path))
    ids = torch.tensor([_prompt()])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, targets["31b"](ids).logits)


def test_save_target_single_file(tmp_path, targets):
    O.save_target(targets["e4b"], str(tmp_path), max_shard_size=None)
    assert "model.safetensors" in os.listdir(tmp_path)
    assert "model.safetensors.index.json" not in os.listdir(tmp_path)


@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_multimodal_layout(kind, tmp_path, targets):
    model = O.make_target(kind, seed=0, layout="multimodal")
    O.save_target(model, str(tmp_path))
    keys = _checkpoint_keys(str(tmp_path))
    text = [k for k in keys if k.startswith("model.language_model.")]
    assert "model.language_model.embed_tokens.weight" in text and "model.language_model.norm.weight" in text
    assert any(k.startswith("model.vision_tower.") for k in keys)
    assert any(k.startswith("model.embed_vision.") for k in keys)
    assert any(k.startswith("model.audio_tower.") for k in keys) == (kind == "e2b")
    assert all(k.startswith(("model.language_model.", "model.vision_tower.", "model.embed_vision.",
                             "model.audio_tower.", "model.embed_audio.")) for k in keys)
    with open(tmp_path / "config.json") as fh:
        assert json.load(fh)["text_config"]["global_head_dim"] == 32
    ids = torch.tensor([_prompt()])  # same text weights as the text layout
    with torch.no_grad():
        mm_logits, text_logits = model(input_ids=ids).logits, targets[kind](ids).logits
    torch.testing.assert_close(mm_logits, text_logits, rtol=1e-5, atol=1e-5)


def test_assistant_checkpoint(tmp_path, targets):
    assistant = O.make_assistant(targets["e2b"], seed=1, ordered_embeddings=True)
    order = assistant.masked_embedding.token_ordering
    assert order.dtype == torch.int64 and torch.equal(order.sort().values, torch.arange(256))
    assert not torch.equal(order, torch.arange(256))
    assert all(layer.self_attn.is_kv_shared_layer for layer in assistant.model.layers)
    assert assistant.config.backbone_hidden_size == 64
    O.save_assistant(assistant, str(tmp_path))
    keys = _checkpoint_keys(str(tmp_path))
    assert "masked_embedding.token_ordering" in keys and "lm_head.weight" not in keys
    assert "pre_projection.weight" in keys and not any("k_proj" in k for k in keys)
    reloaded = O.load_assistant(str(tmp_path))
    for name, t in assistant.state_dict().items():
        assert torch.equal(t, reloaded.state_dict()[name]), name


# ------------------------------------------------------------------------------------------------------------
# forward helpers and assisted generation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["e2b", "31b"])
def test_target_forward_shared_kv_shapes(kind, targets):
    target, prompt = targets[kind], _prompt()
    out = O.target_forward(target, prompt)
    nkv_s, nkv_f = (1, 1) if kind == "e2b" else (2, 1)
    assert out["logits"].shape == (1, PROMPT_LEN, 256) and out["hidden"].shape == (1, PROMPT_LEN, 64)
    assert out["shared_kv"][F][0].shape == (1, nkv_f, PROMPT_LEN, 32)
    assert out["shared_kv"][S][1].shape == (1, nkv_s, PROMPT_LEN, 16)  # prefill: all prompt tokens
    verify = O.target_forward(target, [5, 6, 7, 8], out["past_key_values"])  # bonus + 3 drafts
    assert verify["shared_kv"][F][0].shape[2] == PROMPT_LEN + 4
    assert verify["shared_kv"][S][0].shape[2] == 8 - 1 + 4  # W - 1 + T
    with torch.no_grad():
        full = target(torch.tensor([prompt + [5, 6, 7, 8]])).logits
    torch.testing.assert_close(verify["logits"], full[:, -4:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["hidden"][0, -1].norm(), out["hidden"][0, -1].norm())


@pytest.mark.parametrize("kind,ordered", [("e2b", False), ("e2b", True), ("31b", False), ("31b", True)])
def test_assisted_equals_greedy(kind, ordered, targets):
    target = targets[kind]
    assistant = O.make_assistant(target, seed=1, ordered_embeddings=ordered)
    greedy = O.greedy_generate(target, _prompt(), 30)
    for clean in (True, False):
        stats = {}
        tokens, accepted = O.assisted_generate(target, assistant, _prompt(), 30, 3, clean_shared_kv=clean,
                                               stats=stats)
        assert tokens == greedy
        # every round emits accepted + 1 tokens; the prefill emits the first one
        assert len(tokens) == 1 + sum(a + 1 for a in accepted) and len(accepted) == len(stats["rounds"])
        drafts = [r["drafts"] for r in stats["rounds"]]
        assert all(0 <= a <= k <= 3 for a, k in zip(accepted, drafts))
        assert drafts[-1] == 0 and drafts[0] == 3  # HF caps K at max_length - len - 1
        positions = [r["position"] for r in stats["rounds"] if r["drafts"]]
        assert positions[0] == PROMPT_LEN  # HF convention: len(input_ids) - 1 = bonus-token position


def _round_reference(target, assistant, prompt, clean):
    stats = {}
    tokens, _ = O.assisted_generate(target, assistant, prompt, 30, 3, clean_shared_kv=clean, stats=stats)
    with torch.no_grad():
        ref = target(torch.tensor([prompt + tokens]), use_cache=False, return_shared_kv_states=True,
                     output_hidden_states=True)
    return prompt + tokens, stats["rounds"], ref


@pytest.mark.parametrize("kind", ["e2b", "31b"])
def test_clean_shared_kv_matches_no_cache_forward(kind, targets):
    target = targets[kind]
    assistant = O.make_assistant(target, seed=1)
    _, rounds, ref = _round_reference(target, assistant, _prompt(), clean=True)
    close = {"rtol": 1e-4, "atol": 1e-4}
    ref_kv = ref.shared_kv_states
    for r in rounds:
        if not r["drafts"]:
            continue
        p = r["position"] - 1  # position of the hidden state = last verified token
        lo = max(0, p - 8)  # sliding: last W + 1 entries ending at p
        for i in range(2):
            torch.testing.assert_close(r["shared_kv"][F][i], ref_kv[F][i][:, :, : p + 1], **close)
            torch.testing.assert_close(r["shared_kv"][S][i], ref_kv[S][i][:, :, lo : p + 1], **close)
        torch.testing.assert_close(r["hidden"], ref.hidden_states[-1][:, p : p + 1], **close)


def test_unpatched_hf_leaks_rejected_drafts(targets):
    """Documents spec §5.2: without the fix the full-layer K/V handed to the drafter after a partial rejection
    contains the first rejected draft (length p + 2), and the sliding tensor keeps rejected entries too."""
    target = targets["31b"]
    _, rounds, _ = _round_reference(target, O.make_assistant(target, seed=1), _prompt(), clean=False)
    prev = None
    for r in rounds:
        if prev is not None and r["drafts"] and prev["accepted"] < prev["drafts"]:
            p = r["position"] - 1
            assert r["shared_kv"][F][0].shape[2] == p + 2
            assert r["shared_kv"][S][0].shape[2] == 8 - 1 + prev["drafts"] + 1
        prev = r


@pytest.mark.parametrize("ordered", [False, True])
def test_drafter_step_reproduces_hf_drafts(ordered, targets):
    target = targets["e2b"]
    assistant = O.make_assistant(target, seed=1, ordered_embeddings=ordered)
    seq, rounds, _ = _round_reference(target, assistant, _prompt(), clean=True)
    for r in rounds[:6]:
        token, hidden, drafted = seq[r["position"]], r["hidden"], []
        for _ in range(r["drafts"]):
            logits, hidden, y = O.drafter_step(assistant, target, token, hidden, r["shared_kv"],
                                               r["position"], return_normed=True)
            assert logits.shape == (1, 1, 256) and hidden.shape == (1, 1, 64) and y.shape == (1, 1, 32)
            token = int(logits.argmax(-1))
            drafted.append(token)
            if ordered:
                ids, sel = O.masked_embedder_candidates(assistant, y)
                assert ids.shape == sel.shape == (1, 1, 64) and len(set(ids.flatten().tolist())) == 64
                torch.testing.assert_close(logits[0, 0, ids[0, 0]], sel[0, 0])
                rest = torch.ones(256, dtype=torch.bool)
                rest[ids[0, 0]] = False
                assert torch.all(logits[0, 0, rest] == sel.min() - 1)
        assert drafted == r["draft_tokens"]


def test_trained_assistant_accepts_a_mix_of_drafts(targets):
    target, prompts = targets["e2b"], [_prompt(7)]
    assistant = O.train_assistant(O.make_assistant(target, seed=1, ordered_embeddings=True), target, prompts)
    all_accepted = []
    for prompt in prompts:
        for clean in (True, False):
            tokens, accepted = O.assisted_generate(target, assistant, prompt, 40, 3, clean_shared_kv=clean)
            assert tokens == O.greedy_generate(target, prompt, 40)
            assert len(tokens) == 1 + sum(a + 1 for a in accepted)
            all_accepted += accepted
    assert {0, 1, 2, 3} <= set(all_accepted)  # full, partial and no acceptance all occur
