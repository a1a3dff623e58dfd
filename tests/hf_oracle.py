"""Hugging Face transformers oracle for Gemma 4 targets and the Gemma 4 MTP assistant (tests only).

Pure torch/transformers: this module must not import mlx or mlx_gemma_mtp, so the parity tests compare two
independent implementations.  It provides

* tiny random target/assistant configs that mirror the released architectures (spec §7) at toy size,
* weight perturbations that make random tiny models context-dependent (HF's default init makes a tiny Gemma
  repeat the last token forever, which hides bugs),
* the patch for transformers 5.23.0's ``Gemma4TextConfig.kv_sharing_modes`` (spec §9), and
* thin wrappers around the HF target forward, one drafter step, plain greedy and MTP-assisted greedy
  generation (recording every round, with an optional fix for HF's stale shared-K/V leak, spec §5.2), and
* ``train_assistant``: overfits a drafter to given prompts so assisted decoding accepts a mix of 0..K drafts.

Conventions: batch size 1, float32, CPU.  Generation helpers return only the newly generated tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import types

import torch
from transformers import (
    DynamicCache,
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    GenerationConfig,
)
from transformers.generation import candidate_generator as _hf_cg
from transformers.generation import utils as _hf_gen_utils

TARGET_KINDS = ("e2b", "e4b", "31b", "moe")

# The oracle's models are tiny: intra-op threading only adds overhead, and on a shared 2-core machine it
# thrashes (measured 10-30x slower with 2 threads under load).
torch.set_num_threads(1)

S, F = "sliding_attention", "full_attention"

# HF defaults for Gemma 4 (spec §1.1); written out explicitly so the saved config.json carries them.
DEFAULT_ROPE_PARAMETERS = {
    S: {"rope_type": "default", "rope_theta": 10_000.0},
    F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# Released targets stop on <eos>=1 and <end_of_turn>=106 (spec §5.4); 106 fits in the toy vocab of 256.
EOS_TOKEN_IDS = [1, 106]

# --- KV-sharing patch (spec §9.1-9.3); HF's original property is kept for tests of its defects -------------

HF_KV_SHARING_MODES = Gemma4TextConfig.__dict__["kv_sharing_modes"]


def _fixed_kv_sharing_modes(self) -> list[str | None]:
    """Per-layer KV-sharing mode (``None`` / ``"store"`` / ``"reuse"``) with the intended 5.23.0 semantics.

    Differences to HF: an all-shared config (every assistant) yields all ``"reuse"`` instead of raising, and a
    config without shared layers (26B/31B) still marks the last layer of each type ``"store"`` so the target
    exports ``shared_kv_states`` for the drafter.
    """
    num_layers = self.num_hidden_layers
    num_shared = self.num_kv_shared_layers or 0
    if num_shared >= num_layers:
        return ["reuse"] * num_layers
    first_shared = num_layers - num_shared
    modes: list[str | None] = [None] * first_shared + ["reuse"] * num_shared
    producer_types = self.layer_types[:first_shared]
    if set(producer_types) != set(self.layer_types):  # same check (and message) as HF
        raise ValueError("The set of layer types producing a cache is different than the set of layer types "
                         "using them")
    for layer_type in set(producer_types):
        last = first_shared - 1 - producer_types[::-1].index(layer_type)
        modes[last] = "store"
    return modes


def apply_kv_sharing_patch() -> None:
    """Install the fixed ``kv_sharing_modes`` permanently (idempotent)."""
    Gemma4TextConfig.kv_sharing_modes = property(_fixed_kv_sharing_modes)


@contextlib.contextmanager
def patch_kv_sharing_modes():
    """Context manager installing the fixed ``kv_sharing_modes``; restores whatever was installed before.

    Modules read the property at construction, so models built (or loaded) inside the context keep the
    fixed behaviour.  ``DynamicCache(config=...)`` reads it too ("reuse" layers get no cache): HF's property
    gets that right for targets but raises for assistants; never build a cache from an assistant config.
    """
    previous = Gemma4TextConfig.__dict__["kv_sharing_modes"]
    apply_kv_sharing_patch()
    try:
        yield
    finally:
        Gemma4TextConfig.kv_sharing_modes = previous


# --- Configs ------------------------------------------------------------------------------------------------

_COMMON_TEXT = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2, "head_dim": 16,
    "global_head_dim": 32, "sliding_window": 8, "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "max_position_embeddings": 4096,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "dtype": "float32",
}
_NO_PLE = {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}
_PLE = {"hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 256, "attention_k_eq_v": False}
_K_EQ_V = {"num_key_value_heads": 2, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
           "num_kv_shared_layers": 0, **_NO_PLE}
_KIND_TEXT = {
    # E2B: (SSSSF) pattern, PLE, last 3 layers reuse K/V (producers: sliding 3, full 4), double-wide MLP on
    # the shared layers, 1 KV head everywhere.
    "e2b": {"layer_types": [S, S, S, S, F, S, S, F], "num_key_value_heads": 1, "num_kv_shared_layers": 3,
            "use_double_wide_mlp": True, **_PLE},
    # E4B: 5:1 pattern, PLE, last 2 layers shared (producers: sliding 4, full 5), 2 KV heads, no double-wide.
    "e4b": {"layer_types": [S, S, S, S, S, F, S, F], "num_key_value_heads": 2, "num_kv_shared_layers": 2,
            **_PLE},
    # 31B: k_eq_v full layers with their own (smaller) KV-head count, no PLE, no sharing (producers 4, 5).
    "31b": {"layer_types": [S, S, F, S, S, F], **_K_EQ_V},
    # 26B-A4B: as 31B plus a MoE block (dense MLP = always-on shared expert) in every layer.
    "moe": {"layer_types": [S, S, F, S, S, F], "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2,
            "moe_intermediate_size": 16, **_K_EQ_V},
}
# Smallest towers the configs allow: they only need to exist in a multimodal checkpoint.
_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4, "pooling_kernel_size": 2,
           "position_embedding_size": 64}
# subsampling_conv_channels[0] must equal the 128 mel bins: HF sizes the projection after the convs from it
_AUDIO = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
          "subsampling_conv_channels": [128, 4], "conv_kernel_size": 3, "output_proj_dims": 16}


# Placeholder ids inside the toy vocabulary of 256 (released: 255999, 258880, ... do not fit); the test tokenizer
# gets the same ids (`MEDIA_TOKENS`).
TINY_MEDIA_IDS = {"image_token_id": 250, "boi_token_id": 251, "eoi_token_id": 252, "audio_token_id": 253,
                  "boa_token_id": 254, "eoa_token_index": 255, "video_token_id": 249}
MEDIA_TOKENS = {250: "<|image|>", 251: "<|image>", 252: "<image|>", 253: "<|audio|>", 254: "<|audio>",
                255: "<audio|>", 249: "<|video|>"}


def _copy(obj):
    """Deep copy of JSON-like data (callers may mutate the returned lists/dicts)."""
    return json.loads(json.dumps(obj))


def target_config_dict(kind: str, **overrides) -> dict:
    """Kwargs for a tiny float32 ``Gemma4TextConfig`` of the given kind (one of ``TARGET_KINDS``)."""
    if kind not in _KIND_TEXT:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
    cfg = _copy({**_COMMON_TEXT, "rope_parameters": DEFAULT_ROPE_PARAMETERS, **_KIND_TEXT[kind]})
    cfg.update(overrides)
    cfg["num_hidden_layers"] = len(cfg["layer_types"])
    if cfg["layer_types"][-1] != F:
        raise ValueError("Gemma 4 forces the last layer to full attention; pass layer_types ending in F")
    return cfg


def assistant_config_dict(target_text_cfg: dict, ordered_embeddings: bool, **overrides) -> dict:
    """Kwargs for a tiny ``Gemma4AssistantConfig`` matching a target text config dict (spec §1.3, §7.2).

    The attention geometry (head dims, KV heads, k_eq_v, window, RoPE) and the vocabulary are copied from the
    target because the drafter attends directly to the target's K/V tensors.  ``overrides`` may contain a
    ``text_config`` dict merged into the drafter's text config.
    """
    text = {**_COMMON_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "layer_types": [S, S, S, F], "num_hidden_layers": 4, "num_kv_shared_layers": 4,
            "enable_moe_block": False, "use_double_wide_mlp": False, "final_logit_softcapping": None,
            **_NO_PLE}
    for key in ("vocab_size", "head_dim", "global_head_dim", "num_key_value_heads", "attention_k_eq_v",
                "num_global_key_value_heads", "sliding_window", "rope_parameters", "rms_norm_eps"):
        if key in target_text_cfg:
            text[key] = _copy(target_text_cfg[key])
    text.update(overrides.pop("text_config", {}))
    return {"text_config": text, "backbone_hidden_size": target_text_cfg["hidden_size"],
            "use_ordered_embeddings": ordered_embeddings, "num_centroids": 16,
            "centroid_intermediate_top_k": 4, "tie_word_embeddings": True, "dtype": "float32", **overrides}


def _global_attention_keys(text_cfg) -> dict:
    """``global_head_dim`` / ``num_global_key_value_heads`` of a built text config.  HF pops these kwargs into
    ``per_layer_config`` (and saves only that); released config.json files carry the plain keys instead."""
    full = text_cfg.per_layer_config[text_cfg.layer_types.index(F)]
    out = {"global_head_dim": full.head_dim}
    if text_cfg.attention_k_eq_v:
        out["num_global_key_value_heads"] = full.num_key_value_heads
    return out


# --- Weight perturbation (make tiny random models context dependent) ----------------------------------------


# Embedding std relative to 1/sqrt(H): with larger values the current token's own embedding dominates the tied
# LM head and greedy decoding collapses into repeating tokens (tuned: >= 13 distinct of 48 for every kind).
EMBED_STD_FACTOR = 0.15
# Gain on the final norm weight: rescales all logits uniformly (greedy order unchanged) to max ~4, where
# softcapping (30 * tanh(x / 30)) moves them by ~0.02 (far above fp32 noise) without saturating; larger logits
# only scale up the absolute fp32 differences that parity tests bound (1e-4).
FINAL_NORM_GAIN = 6.0


@torch.no_grad()
def _perturb_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-draw the weights of a Gemma 4 text model / assistant so that greedy output depends on the context.

    Why: with HF's init (norms = 1, layer_scalar = 1, weights N(0, 0.02)) the tied LM head mostly scores the
    current token's own embedding, so greedy decoding repeats one token.  Norm weights, layer scalars and the
    router scales ~ U(0.5, 1.5) (q/k norms and the final norm rescaled, see below); projections N(0, 1/fan_in)
    (variance preserving); embeddings see ``EMBED_STD_FACTOR``.  Deterministic given ``generator``.
    """

    def uniform(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(t.shape, generator=generator, dtype=torch.float32)

    def normal(t: torch.Tensor, std: float) -> torch.Tensor:
        return std * torch.randn(t.shape, generator=generator, dtype=torch.float32)

    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("layer_scalar"))
    for name in sorted(tensors):
        t, leaf = tensors[name], name.rsplit(".", 1)[-1]
        if name.endswith("model.norm.weight"):
            new = FINAL_NORM_GAIN * uniform(t, 0.5, 1.5)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            # Gemma 4 has no 1/sqrt(d) attention scaling; trained q/k norms absorb it.  Without this,
            # attention logits reach ~20 and fp32 round-off grows ~3x per layer (near-tie greedy flips).
            new = uniform(t, 0.5, 1.5) * t.shape[0] ** -0.25
        elif "norm" in name or leaf in ("layer_scalar", "scale", "per_expert_scale"):
            new = uniform(t, 0.5, 1.5)
        elif "embed_tokens" in name:  # scaled by sqrt(H) at the input
            new = normal(t, EMBED_STD_FACTOR * t.shape[-1] ** -0.5)
        elif t.dim() in (2, 3):  # nn.Linear [out, in] and MoE experts [E, out, in]
            new = normal(t, t.shape[-1] ** -0.5)
        else:
            continue
        t.copy_(new.to(t.dtype))


# --- Targets ------------------------------------------------------------------------------------------------


def make_target_config(kind: str, layout: str = "text", **overrides):
    """``Gemma4TextConfig`` (layout "text") or ``Gemma4Config`` with tiny towers (layout "multimodal"; audio
    tower only for e2b/e4b, as released)."""
    text = Gemma4TextConfig(**target_config_dict(kind, **overrides))
    if layout == "text":
        return text
    if layout != "multimodal":
        raise ValueError(f"unknown layout {layout!r}")
    audio = Gemma4AudioConfig(**_AUDIO) if kind in ("e2b", "e4b") else None
    return Gemma4Config(text_config=text, vision_config=Gemma4VisionConfig(**_VISION), audio_config=audio,
                        dtype="float32", **TINY_MEDIA_IDS)


@torch.no_grad()
def perturb_towers(model, seed: int = 0) -> None:
    """Re-draw a multimodal target's tower and embedder weights so that media matter: HF's init leaves a tiny
    vision tower nearly blind to patch position and a tiny audio tower's attention nearly uniform, so a test on
    untouched towers passes even when media are ignored or misplaced. Projections N(0, 1/fan_in), norms and
    scales U(0.5, 1.5), the patch position table N(0, 1); clip bounds stay as they are."""
    generator = torch.Generator().manual_seed(seed)
    for name, t in sorted(model.named_parameters()):
        if not name.startswith(("model.vision_tower", "model.audio_tower", "model.embed_vision",
                                "model.embed_audio")):
            continue
        if "position_embedding" in name:
            new = torch.randn(t.shape, generator=generator)
        elif "norm" in name or name.endswith(("scale", "per_dim_scale")) or t.dim() == 1:
            new = 0.5 + torch.rand(t.shape, generator=generator)
        else:
            new = torch.randn(t.shape, generator=generator) * t[0].numel() ** -0.5
        t.copy_(new.to(t.dtype))


def make_target(kind: str, seed: int = 0, layout: str = "text", **overrides):
    """Tiny random float32 eval-mode target: ``Gemma4ForCausalLM`` ("text") or
    ``Gemma4ForConditionalGeneration`` ("multimodal", text weights under ``model.language_model.``).

    The text weights depend only on (kind, seed, overrides), not on the layout, so both layouts produce
    identical text logits (towers re-drawn by `perturb_towers`).
    """
    torch.manual_seed(seed)
    with patch_kv_sharing_modes():
        text_model = Gemma4ForCausalLM(make_target_config(kind, "text", **overrides))
        _perturb_weights(text_model, torch.Generator().manual_seed(seed))
        if layout == "text":
            return text_model.float().eval()
        model = Gemma4ForConditionalGeneration(make_target_config(kind, layout, **overrides))
    model.model.language_model.load_state_dict(text_model.model.state_dict())
    perturb_towers(model, seed)
    return model.float().eval()


def _released_style_config(path: str, text_cfg) -> None:
    """Rewrite a saved config.json like the released ones: plain ``global_head_dim`` /
    ``num_global_key_value_heads`` in the text config instead of HF's derived ``per_layer_config`` (HF
    rebuilds it from those keys on load)."""
    file = os.path.join(path, "config.json")
    with open(file) as fh:
        cfg = json.load(fh)
    text = cfg.get("text_config") or cfg
    text.pop("per_layer_config", None)
    text.update(_global_attention_keys(text_cfg))
    with open(file, "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)


def save_target(model, path: str, max_shard_size: str | int | None = "50KB",
                eos_token_ids: list[int] | None = None) -> None:
    """Save a target as safetensors, sharded with ``model.safetensors.index.json`` (``max_shard_size=None``:
    one ``model.safetensors``), with a released-style config.json and a ``generation_config.json`` holding the
    released EOS ids (default [1, 106]) and sampling defaults (HF would copy eos=1 from the config)."""
    model.save_pretrained(path, max_shard_size=max_shard_size if max_shard_size is not None else "50GB")
    _released_style_config(path, model.config.get_text_config())
    GenerationConfig(bos_token_id=2, pad_token_id=0, eos_token_id=list(eos_token_ids or EOS_TOKEN_IDS),
                     do_sample=True, temperature=1.0, top_p=0.95, top_k=64).save_pretrained(path)


def load_target(path: str, layout: str = "text"):
    """Load a saved target under the KV-sharing patch (float32, eval)."""
    cls = Gemma4ForCausalLM if layout == "text" else Gemma4ForConditionalGeneration
    with patch_kv_sharing_modes():
        return cls.from_pretrained(path, dtype=torch.float32).eval()


def make_assistant(target_model_or_cfg, seed: int = 0, ordered_embeddings: bool = False, **overrides):
    """Tiny random float32 eval-mode ``Gemma4AssistantForCausalLM`` matching a target (model, config object or
    ``target_config_dict``), built under the KV-sharing patch; ``num_assistant_tokens`` defaults to 3.

    With ``ordered_embeddings`` the masked embedder has 16 centroids x 16 tokens, top-k 4, and a random
    permutation as ``token_ordering`` (HF initialises it to zeros) so tests catch ordering bugs.
    """
    target_cfg = target_model_or_cfg
    if not isinstance(target_cfg, dict):
        text_cfg = getattr(target_cfg, "config", target_cfg).get_text_config()
        target_cfg = {**text_cfg.to_dict(), **_global_attention_keys(text_cfg)}
    cfg = Gemma4AssistantConfig(**assistant_config_dict(target_cfg, ordered_embeddings, **overrides))
    torch.manual_seed(seed)
    with patch_kv_sharing_modes():
        model = Gemma4AssistantForCausalLM(cfg)
    generator = torch.Generator().manual_seed(seed)
    _perturb_weights(model, generator)
    with torch.no_grad():  # balance the drafter input: target embedding RMS ~EMBED_STD_FACTOR, hidden ~GAIN
        backbone = cfg.backbone_hidden_size
        model.pre_projection.weight[:, :backbone] /= EMBED_STD_FACTOR
        model.pre_projection.weight[:, backbone:] /= FINAL_NORM_GAIN
    if model.masked_embedding is not None:
        vocab = cfg.get_text_config().vocab_size
        model.masked_embedding.token_ordering.copy_(torch.randperm(vocab, generator=generator))
    model.generation_config.num_assistant_tokens = 3
    return model.float().eval()


def save_assistant(model, path: str) -> None:
    """Save an assistant as one ``model.safetensors`` (tied ``lm_head`` omitted) + released-style config."""
    model.save_pretrained(path)
    _released_style_config(path, model.config.get_text_config())


def load_assistant(path: str):
    """Load a saved assistant under the KV-sharing patch (float32, eval)."""
    with patch_kv_sharing_modes():
        return Gemma4AssistantForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def train_assistant(assistant, target, prompts: list[list[int]], new_tokens: int = 40, steps: int = 60,
                    num_drafts: int = 3, corrupt: float = 0.25, seed: int = 0, lr: float = 1e-2):
    """Overfit the drafter to the target's greedy continuations of ``prompts`` (equal lengths) so that
    assisted decoding of exactly those prompts accepts drafts (random drafters accept ~nothing, leaving the
    n > 0 paths untested).  A fraction ``corrupt`` of the labels is replaced by random tokens, which yields a
    mix of 0..K accepted drafts per round.  Teacher forcing with the clean semantics (HF query position p + 1,
    full K/V ``0..p``, sliding ``p-W..p``); the HF assistant modules process all positions at once through
    4-D masks.  Deterministic; returns the assistant in eval mode (~2-5 s for 2 prompts on one CPU core)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.tensor([list(p) + greedy_generate(target, p, new_tokens) for p in prompts])
    with torch.no_grad():
        out = target(seqs, use_cache=False, output_hidden_states=True, return_shared_kv_states=True)
    hidden, shared_kv = out.hidden_states[-1], dict(out.shared_kv_states)
    batch, length = seqs.shape
    pos = torch.arange(len(prompts[0]) - 1, length - 1 - num_drafts)  # hidden-state positions p
    full = torch.arange(length)[None, :] <= pos[:, None]
    window = assistant.config.get_text_config().sliding_window
    sliding = full & (torch.arange(length)[None, :] >= pos[:, None] - window)
    masks = {F: full[None, None], S: sliding[None, None]}
    labels = torch.stack([seqs[:, pos + 2 + j] for j in range(num_drafts)])
    noise = torch.randint(0, assistant.config.get_text_config().vocab_size, labels.shape, generator=gen)
    labels = torch.where(torch.rand(labels.shape, generator=gen) < corrupt, noise, labels)
    with torch.no_grad():  # inputs of draft j: token s[p+1+j] (label s[p+2+j]) at constant position p+1
        embeds = [target.get_input_embeddings()(seqs[:, pos + 1 + j]) for j in range(num_drafts)]
    me, ce = assistant.masked_embedding, torch.nn.functional.cross_entropy
    slot_of = None if me is None else torch.argsort(me.token_ordering)  # token id -> index in token_ordering
    opt = torch.optim.Adam(assistant.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            h, loss = hidden[:, pos], 0.0
            for j in range(num_drafts):
                x = assistant.pre_projection(torch.cat([embeds[j], h], -1))
                # output_hidden_states avoids an HF crash in _maybe_slice_kv_shared_inputs (no PLE, q_len > 1)
                y = assistant.model(inputs_embeds=x, attention_mask=masks, shared_kv_states=shared_kv,
                                    position_ids=(pos + 1).expand(batch, -1), use_cache=False,
                                    output_hidden_states=True).last_hidden_state
                loss = loss + ce(assistant.lm_head(y).flatten(0, 1), labels[j].flatten())
                if me is not None:  # the label's cluster must win the centroid top-k
                    cluster = slot_of[labels[j]] // me.vocab_size_per_centroid
                    loss = loss + ce(me.centroids(y).flatten(0, 1), cluster.flatten())
                h = assistant.post_projection(y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return assistant.eval()


# --- Single forward passes ----------------------------------------------------------------------------------


def new_cache(target):
    """A ``DynamicCache`` with past recording on, as ``_assisted_decoding`` prepares it: sliding layers return
    the last ``W - 1 + T`` entries and can later be rolled back with ``cache.crop(-n)``."""
    cache = DynamicCache(config=target.config.get_text_config())
    cache.activate_past_recording()
    return cache


@torch.no_grad()
def target_forward(target, input_ids, past_key_values=None) -> dict:
    """One target forward as the MTP verify step runs it (hidden states and shared K/V requested).

    Returns ``logits`` [1, T, V] (softcapped), ``hidden`` [1, T, H] (post-final-norm, what the drafter
    consumes), ``shared_kv`` ``{layer_type: (K, V)}`` with K/V ``[1, nkv, S, d]`` of the last non-shared layer
    of each type (full: whole cache; sliding: last ``W - 1 + T`` entries, all of them in a prefill) and
    ``past_key_values`` (pass it back in; roll back rejected drafts with ``.crop(-n)``).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    if past_key_values is None:
        past_key_values = new_cache(target)
    out = target(input_ids=ids, past_key_values=past_key_values, use_cache=True, output_hidden_states=True,
                 return_shared_kv_states=True)
    return {"logits": out.logits, "hidden": out.hidden_states[-1], "shared_kv": dict(out.shared_kv_states),
            "past_key_values": out.past_key_values}


@torch.no_grad()
def drafter_step(assistant, target, token_id: int, hidden: torch.Tensor, shared_kv: dict, position: int,
                 return_normed: bool = False):
    """One drafter step exactly as ``SinglePositionMultiTokenCandidateGenerator.get_candidates`` calls it.

    ``inputs_embeds = cat([target_embed(token) * sqrt(H), hidden])``, ``position_ids = [[position]]`` (HF uses
    ``len(input_ids) - 1``), all-ones 2-D attention mask over ``position + 1`` tokens.  Returns
    ``(logits [1, 1, V], next_hidden [1, 1, H])``; with masked embedding the logits are HF's full-vocab tensor
    (selected logits scattered, everything else ``min(selected) - 1``).  ``return_normed`` adds the drafter's
    post-final-norm state ``y`` [1, 1, Hd] (input of the LM head / masked embedder).
    """
    embed = target.get_input_embeddings()(torch.tensor([[int(token_id)]]))
    inputs_embeds = torch.cat([embed, hidden.reshape(1, 1, -1).to(embed.dtype)], dim=-1)
    kv_len = max(v[0].shape[2] for v in shared_kv.values())
    attention_mask = torch.ones(1, max(position + 1, kv_len), dtype=torch.long)
    captured = {}
    handle = assistant.model.norm.register_forward_hook(lambda mod, inp, out: captured.setdefault("y", out))
    try:
        out = assistant(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=torch.tensor([[position]]), shared_kv_states=shared_kv, use_cache=False)
    finally:
        handle.remove()
    if return_normed:
        return out.logits, out.last_hidden_state, captured["y"]
    return out.logits, out.last_hidden_state


@torch.no_grad()
def masked_embedder_candidates(assistant, y: torch.Tensor):
    """Candidate ids and their logits of the masked (centroid) LM head for post-norm drafter states ``y``.

    Returns ``(ids, logits)``, both ``[B, T, top_k * V / num_centroids]``, in HF's order (top-k clusters in
    ``torch.topk`` order, then the cluster's slots in ``token_ordering`` order).
    """
    me = assistant.masked_embedding
    if me is None:
        raise ValueError("assistant has no masked embedding (use_ordered_embeddings=False)")
    _, top = torch.topk(me.centroids(y), k=me.centroid_intermediate_top_k, dim=-1)
    ids = me.token_ordering.long().view(me.num_centroids, me.vocab_size_per_centroid)[top]
    ids = ids.reshape(*y.shape[:2], -1)
    logits = torch.einsum("btd,btkd->btk", y, assistant.lm_head.weight[ids])
    return ids, logits


# --- Generation ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_eos(model):
    """Disable EOS stopping: ``generate`` fills unset values from ``model.generation_config``, so ``None`` has
    to be set there (``min_new_tokens`` would instead mask EOS logits and change the greedy sequence)."""
    gc = model.generation_config
    saved, gc.eos_token_id = gc.eos_token_id, None
    try:
        yield
    finally:
        gc.eos_token_id = saved


@torch.no_grad()
def greedy_generate(target, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain HF greedy decoding without EOS stopping; returns the ``max_new_tokens`` new tokens."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with _no_eos(target):
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _clean_shared_kv(shared: dict, hidden_pos: int, window: int, hist: types.SimpleNamespace) -> dict:
    """Shared K/V restricted to positions ``<= hidden_pos`` (fix for spec §5.2 / pitfall 23).

    HF slices the verify output to ``len(input_ids)`` which, after a partial rejection, keeps the K/V of the
    first rejected draft (full layer) and up to ``K - n`` rejected drafts (sliding layer, whose tensor does
    not start at position 0).  Clean semantics: full = positions ``0..p``, sliding = last ``W + 1`` entries
    ending at ``p``.  The verify output's sliding tensor only reaches back to ``p - W + 1`` when nothing was
    accepted, so older entries come from the previous round's clean tensor (``hist``: k, v, start = absolute
    position of entry 0; k is None before the first round).
    """
    kf, vf = shared[F]
    end = kf.shape[2]  # the full tensor holds positions 0..end-1, the sliding one ends at end-1 too
    ks, vs = shared[S]
    start = end - ks.shape[2]
    if hist.k is not None and hist.start < start:
        n_old = start - hist.start
        assert hist.k.shape[2] >= n_old, "sliding history is not contiguous with the new verify output"
        ks, vs = torch.cat([hist.k[:, :, :n_old], ks], dim=2), torch.cat([hist.v[:, :, :n_old], vs], dim=2)
        start = hist.start
    keep_end = hidden_pos + 1 - start  # drop entries after the hidden-state position (rejected drafts)
    keep_start = max(0, keep_end - (window + 1))
    ks, vs = ks[:, :, keep_start:keep_end], vs[:, :, keep_start:keep_end]
    hist.k, hist.v, hist.start = ks, vs, start + keep_start
    return {F: (kf[:, :, : hidden_pos + 1], vf[:, :, : hidden_pos + 1]), S: (ks, vs)}


def _recording_generator_class(stats: dict, clean_shared_kv: bool):
    """Subclass of HF's MTP candidate generator that records every round and optionally cleans the shared K/V.

    Hooks: ``get_candidates`` sees the drafts (a forward pre-hook on the assistant captures exactly what HF
    passes to it); ``_assisted_decoding`` calls ``update_candidate_strategy`` once per iteration with the
    final ``n_matches`` (after max-length/EOS cropping).  The first iteration is the prefill, not a round.
    """

    class RecordingGenerator(_hf_cg.SinglePositionMultiTokenCandidateGenerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._pending, self._hist = None, types.SimpleNamespace(k=None, v=None, start=0)
            self._window = self.assistant_model.config.get_text_config().sliding_window
            stats["generator_used"] = True

        def get_candidates(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches,
                           **kwargs):
            if clean_shared_kv and not is_first_iteration and model_outputs is not None:
                # The drafter's hidden state is that of the last accepted token, position len(input_ids) - 2.
                shared = _clean_shared_kv(model_outputs.shared_kv_states, input_ids.shape[1] - 2,
                                          self._window, self._hist)
                model_outputs = types.SimpleNamespace(hidden_states=model_outputs.hidden_states,
                                                      shared_kv_states=shared)
            calls = []
            hook = self.assistant_model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw),
                                                                  with_kwargs=True)
            try:
                ids, logits = super().get_candidates(input_ids, model_kwargs=model_kwargs,
                                                     model_outputs=model_outputs,
                                                     is_first_iteration=is_first_iteration,
                                                     n_last_matches=n_last_matches, **kwargs)
            finally:
                hook.remove()
            if not is_first_iteration:
                first = calls[0] if calls else {}
                backbone = self.assistant_model.backbone_hidden_size
                self._pending = {
                    "drafts": ids.shape[1] - input_ids.shape[1],
                    "draft_tokens": ids[0, input_ids.shape[1]:].tolist(),
                    "position": int(first["position_ids"]) if calls else None,
                    "hidden": first["inputs_embeds"][..., backbone:] if calls else None,
                    "shared_kv": dict(first["shared_kv_states"]) if calls else None,
                }
            return ids, logits

        def update_candidate_strategy(self, input_ids, scores, num_matches):
            if self._pending is not None:
                stats["rounds"].append({**self._pending, "accepted": int(num_matches)})
            self._pending = None
            return super().update_candidate_strategy(input_ids, scores, num_matches)

    return RecordingGenerator


@torch.no_grad()
def assisted_generate(target, assistant, prompt_ids: list[int], max_new_tokens: int,
                      num_assistant_tokens: int, clean_shared_kv: bool = True,
                      stats: dict | None = None) -> tuple[list[int], list[int]]:
    """HF MTP-assisted greedy decoding (``target.generate(assistant_model=...)``) without EOS stopping.

    Returns ``(new_tokens, accepted_per_round)``.  Rounds exclude the prefill, so
    ``len(new_tokens) == 1 + sum(accepted + 1 for each round)``; the last rounds may draft fewer than
    ``num_assistant_tokens`` (HF caps K at ``max_length - len - 1``, down to 0).  ``clean_shared_kv`` hides
    rejected-draft K/V from the drafter (our MLX semantics; HF leaks it, spec §5.2).  ``stats`` (optional
    dict) receives ``rounds``: per round ``drafts`` (K), ``draft_tokens``, ``accepted``, and what the drafter
    got on its first call: ``position`` (HF: len(input_ids) - 1), ``hidden`` [1, 1, H], ``shared_kv``.
    Models must have been built under the KV-sharing patch (``make_*`` / ``load_*`` do that).
    """
    stats = {} if stats is None else stats
    stats.update(rounds=[], generator_used=False)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    agc = assistant.generation_config
    saved_k, saved_cls = agc.num_assistant_tokens, _hf_gen_utils.SinglePositionMultiTokenCandidateGenerator
    agc.num_assistant_tokens = num_assistant_tokens
    # _get_candidate_generator looks the class up in generation.utils' namespace at call time.
    recorder = _recording_generator_class(stats, clean_shared_kv)
    _hf_gen_utils.SinglePositionMultiTokenCandidateGenerator = recorder
    try:
        with _no_eos(target):
            out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=assistant,
                                  max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        _hf_gen_utils.SinglePositionMultiTokenCandidateGenerator = saved_cls
        agc.num_assistant_tokens = saved_k
    if not stats["generator_used"]:
        raise RuntimeError("HF bypassed SinglePositionMultiTokenCandidateGenerator: recording hook is stale")
    return out[0, ids.shape[1]:].tolist(), [r["accepted"] for r in stats["rounds"]]
