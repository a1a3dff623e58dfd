"""Gemma 4 text configuration (`gemma4_text`), read as the hub files and recent transformers spell it.

Reference: transformers `models/gemma4/configuration_gemma4.py` (`Gemma4TextConfig.__post_init__`); spec §1.
Released configs spell the full-attention overrides as `global_head_dim` / `num_global_key_value_heads`; recent
`save_pretrained` writes them as `per_layer_config` ({layer index: {head_dim, num_key_value_heads}}). Both are
turned into explicit per-layer lists here, so the model never guesses. Each field's type and range is checked
before anything is derived from it; errors name the field as the JSON does (`text_config.sliding_window`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
_ROPE_TYPES = ("default", "proportional")

Rule = tuple[Callable[[Any], bool], str]  # (test, what the value must be)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT: Rule = (lambda v: _is_int(v) and v > 0, "a positive integer")
COUNT: Rule = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
POSITIVE: Rule = (lambda v: _is_number(v) and v > 0, "a positive number")
NON_NEGATIVE: Rule = (lambda v: _is_number(v) and v >= 0, "a number >= 0")
FRACTION: Rule = (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
STRING: Rule = (lambda v: isinstance(v, str), "a string")
OBJECT: Rule = (lambda v: isinstance(v, dict), "a JSON object")
STRINGS: Rule = (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings")


def optional(rule: Rule) -> Rule:
    test, want = rule
    return (lambda v: v is None or test(v)), f"{want} or null"


def check_fields(values: dict, rules: dict[str, Rule], where: str = "") -> None:
    """Raise a ValueError naming `where + name` for the first present value that breaks its rule."""
    for name, (test, want) in rules.items():
        if name in values and not test(values[name]):
            raise ValueError(f"{where}{name}={values[name]!r} must be {want}")


TEXT_FIELDS: dict[str, Rule] = {
    **dict.fromkeys(
        ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "global_head_dim", "sliding_window", "max_position_embeddings"),
        POSITIVE_INT,
    ),
    **dict.fromkeys(
        ("vocab_size_per_layer_input", "hidden_size_per_layer_input", "num_kv_shared_layers", "pad_token_id"),
        COUNT,
    ),
    **dict.fromkeys(
        ("num_global_key_value_heads", "num_experts", "top_k_experts", "moe_intermediate_size"),
        optional(POSITIVE_INT),
    ),
    **dict.fromkeys(
        ("attention_k_eq_v", "enable_moe_block", "use_double_wide_mlp", "tie_word_embeddings",
         "attention_bias"),
        BOOL,
    ),
    "hidden_activation": STRING,
    "rms_norm_eps": NON_NEGATIVE,
    "final_logit_softcapping": optional(POSITIVE),  # 0 would divide by zero
    "layer_types": optional(STRINGS),
    "rope_parameters": optional(OBJECT),
    "use_bidirectional_attention": optional(STRING),
    "per_layer_config": optional(OBJECT),
}
ROPE_FIELDS: dict[str, Rule] = {
    "rope_type": STRING, "rope_theta": POSITIVE, "partial_rotary_factor": FRACTION, "factor": POSITIVE
}
LAYER_FIELDS: dict[str, Rule] = {"head_dim": POSITIVE_INT, "num_key_value_heads": POSITIVE_INT}


@dataclass
class ModelArgs:
    vocab_size: int = 262144
    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    max_position_embeddings: int = 131072  # not enforced: decoding warns past it
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    final_logit_softcapping: float | None = 30.0
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int = 0
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    use_bidirectional_attention: str | None = None  # "vision": an image's soft tokens see each other (sliding)
    pad_token_id: int = 0  # what a multimodal placeholder is looked up as in the per-layer embeddings
    per_layer_config: dict | None = None
    # how errors name the fields: "text_config." inside a multimodal or drafter config
    where: InitVar[str] = ""
    # derived in __post_init__
    layer_head_dims: list[int] = field(init=False)
    layer_kv_heads: list[int] = field(init=False)

    def __post_init__(self, where: str):
        check_fields(vars(self), TEXT_FIELDS, where)  # before anything is derived from the values
        self._check_nested(where)
        L = self.num_hidden_layers
        if self.layer_types is None:  # HF default: 5 sliding, 1 full (mlx-lm's 4:1 default is wrong here)
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(L)]
        self.layer_types = list(self.layer_types)
        if self.layer_types and self.layer_types[-1] != FULL:
            self.layer_types[-1] = FULL  # HF forces the last layer to full attention
        if self.rope_parameters is None:
            self.rope_parameters = {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            }
        self._derive_per_layer()
        self.validate(where)

    def _check_nested(self, where: str) -> None:
        for layer_type, rope in (self.rope_parameters or {}).items():
            check_fields({layer_type: rope}, {layer_type: OBJECT}, f"{where}rope_parameters.")
            check_fields(rope, ROPE_FIELDS, f"{where}rope_parameters.{layer_type}.")
        for key, layer in (self.per_layer_config or {}).items():
            if not (str(key).isdigit() and int(key) < self.num_hidden_layers):
                raise ValueError(f"{where}per_layer_config has key {key!r}: must be a layer index in "
                                 f"[0, num_hidden_layers={self.num_hidden_layers})")
            check_fields({key: layer}, {key: OBJECT}, f"{where}per_layer_config.")
            check_fields(layer, LAYER_FIELDS, f"{where}per_layer_config.{key}.")

    def _derive_per_layer(self) -> None:
        overrides = {int(k): v for k, v in (self.per_layer_config or {}).items()}
        if not overrides:  # hub spelling: full layers get the global values
            full = {"head_dim": self.global_head_dim}
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                full["num_key_value_heads"] = self.num_global_key_value_heads
            overrides = {i: full for i, t in enumerate(self.layer_types) if t == FULL}
        else:  # save_pretrained spelling: recover the hub fields for writing configs back
            full_ids = [i for i, t in enumerate(self.layer_types) if t == FULL]
            if full_ids and full_ids[0] in overrides:
                self.global_head_dim = overrides[full_ids[0]].get("head_dim", self.head_dim)
                self.num_global_key_value_heads = overrides[full_ids[0]].get("num_key_value_heads")
        self.layer_head_dims = [overrides.get(i, {}).get("head_dim", self.head_dim) for i in range(self.num_hidden_layers)]
        self.layer_kv_heads = [
            overrides.get(i, {}).get("num_key_value_heads", self.num_key_value_heads)
            for i in range(self.num_hidden_layers)
        ]
        self.per_layer_config = None

    def validate(self, where: str = "") -> None:
        """Reject configs this implementation cannot run, naming the field (after `where`) and the fix."""

        def bad(name, value, why):
            raise ValueError(f"unsupported Gemma 4 config: {where}{name}={value!r} ({why})")

        if len(self.layer_types) != self.num_hidden_layers:
            bad("layer_types", self.layer_types, f"needs {self.num_hidden_layers} entries")
        if unknown := set(self.layer_types) - {SLIDING, FULL}:
            bad("layer_types", sorted(unknown), f"only {SLIDING!r} and {FULL!r} exist")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            bad("hidden_activation", self.hidden_activation, "Gemma 4 uses gelu_pytorch_tanh")
        if self.use_bidirectional_attention == "all":
            bad("use_bidirectional_attention", "all", "not a causal language model")
        if not self.tie_word_embeddings:
            bad("tie_word_embeddings", False, "Gemma 4 ties the LM head to the embedding")
        if self.attention_bias:
            bad("attention_bias", True, "Gemma 4 attention has no biases")
        for t in set(self.layer_types):
            rope = self.rope_parameters.get(t)
            if rope is None or rope.get("rope_type", "default") not in _ROPE_TYPES:
                bad("rope_parameters", self.rope_parameters, f"need {t} with rope_type in {_ROPE_TYPES}")
        if self.num_attention_heads % max(self.layer_kv_heads) or any(
            self.num_attention_heads % h for h in self.layer_kv_heads
        ):
            bad("num_key_value_heads", self.layer_kv_heads, "must divide num_attention_heads")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            bad("enable_moe_block", True, "needs num_experts, top_k_experts and moe_intermediate_size")
        if self.enable_moe_block and self.top_k_experts > self.num_experts:
            bad("top_k_experts", self.top_k_experts, f"must be <= num_experts={self.num_experts}")
        if not 0 <= self.num_kv_shared_layers <= self.num_hidden_layers:
            bad("num_kv_shared_layers", self.num_kv_shared_layers, "must be within [0, num_hidden_layers]")
        first_shared = self.first_kv_shared_layer
        if first_shared < self.num_hidden_layers and first_shared > 0:
            if set(self.layer_types[first_shared:]) - set(self.layer_types[:first_shared]):
                bad("num_kv_shared_layers", self.num_kv_shared_layers, "a shared layer type has no producer")

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_producer(self, layer_type: str) -> int:
        """Index of the last non-shared layer of `layer_type`: its K/V are shared with consumers and the drafter."""
        candidates = [i for i in range(self.first_kv_shared_layer) if self.layer_types[i] == layer_type]
        if not candidates:
            raise ValueError(f"no KV-producing layer of type {layer_type!r}")
        return candidates[-1]

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "") -> ModelArgs:
        """Build from a `gemma4` (multimodal) or `gemma4_text` config dict; unknown keys are ignored.

        `where` prefixes field names in errors (a drafter's text config passes "text_config.").
        """
        if not isinstance(config, dict):
            what = where.rstrip(".") or "the config"
            raise ValueError(f"{what} must be a JSON object, not {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type == "gemma4":
            text = config.get("text_config")
            check_fields({"text_config": text}, {"text_config": OBJECT}, where)  # the text model's config
            config, where = {**text, "model_type": "gemma4_text"}, f"{where}text_config."
        elif model_type != "gemma4_text":
            raise ValueError(
                f"model_type {model_type!r} is not a Gemma 4 target (expected 'gemma4' or 'gemma4_text')"
            )
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in config.items() if k in names}, where=where)

    def to_dict(self) -> dict[str, Any]:
        """Hub spelling (`global_head_dim`, `num_global_key_value_heads`), loadable by HF and by `from_dict`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out.pop("per_layer_config")
        return {"model_type": "gemma4_text", **out}
