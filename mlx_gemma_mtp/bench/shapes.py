"""The benchmark at a released shape (`bench --shape e2b --bits 4`), and mlx-lm's plain decoding on the same weights.

The pair is `presets.random_pair`: a preset's real widths and vocabulary (V = 262,144), optionally cut to fewer
layers, with random weights made directly in bfloat16 or quantized form (`--bits 4`/`8`: the converter's "mixed"
recipe; `16`: bfloat16). `--bits 32` casts that bfloat16 pair to float32 tensor by tensor: on a CPU, where MLX's
quantized and bfloat16 matmuls are slow, float32 at a few layers keeps the head, the clustered drafter head and
the sampling cost real and the timing affordable.

mlx-lm's `gemma4_text.Model` is built from the same text config and given the same arrays (parameter names are
the checkpoint's in both, so nothing is renamed or copied; a quantized pair gets mlx-lm's modules quantized with
the same group size and bits per path). Its plain greedy decoding is mlx-lm's own `generate_step` with its own
cache, its argmax sampler and log-softmax, on our generation stream's sibling (its `generation_stream`), timed
like ours: tokens after the first over the seconds after the first.
"""

from __future__ import annotations

import time

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from ..convert.quantize import apply_plan, quantizable_modules, target_plan, transform
from ..load import Bundle, materialize
from ..models.gemma4_assistant import Drafter
from ..models.gemma4_text import Model
from ..testing.presets import GROUP_SIZE, PRESETS, random_pair

BITS = (4, 8, 16, 32)  # 4 / 8: quantized (mixed recipe); 16: bfloat16; 32: float32


def dtype_name(bits: int) -> str:
    return {16: "bfloat16", 32: "float32"}.get(bits, f"{bits}-bit (mixed recipe)")


def add_pair_arguments(p, bits: int, bits_help: str) -> None:
    """The flags that choose a benchmark's pair: a checkpoint (`--model`, `--draft`), the demo pair, a random pair
    (`--random-hidden`) or a released shape (`--shape` with `--bits` (default `bits`), `--layers`, `--vocab`,
    `--experts`)."""
    p.add_argument("--model", default=None, help="target (or bundle) folder / hub id; default: a random pair")
    p.add_argument("--draft", default=None)
    p.add_argument("--demo", action="store_true", help="the shipped demo pair on held-out stdlib code")
    p.add_argument("--random-hidden", type=int, default=512)
    p.add_argument("--shape", default=None, choices=tuple(PRESETS), help="a random pair of a released shape")
    p.add_argument("--bits", type=int, default=bits, choices=BITS, help=bits_help)
    p.add_argument("--layers", type=int, default=None, help="--shape: keep this many target layers")
    p.add_argument("--vocab", type=int, default=None, help="--shape: a smaller vocabulary (default 262144)")
    p.add_argument("--experts", type=int, default=None, help="--shape 26b-a4b: keep this many experts")


def check_shape_args(shape: str, bits: int) -> None:
    """Refuse what cannot run here, with the fix in the message."""
    if shape not in PRESETS:
        raise ValueError(f"--shape {shape!r} is not a preset; choose one of {tuple(PRESETS)}")
    if bits not in BITS:
        raise ValueError(f"--bits {bits!r}: choose 4 or 8 (quantized), 16 (bfloat16) or 32 (float32)")
    moe = PRESETS[shape].text.get("enable_moe_block", False)
    if moe and bits == 16 and mx.default_device() == mx.cpu:
        raise ValueError(f"--shape {shape} --bits 16: MLX's CPU backend runs the experts' gather_mm in float32 "
                         "only; use --bits 32 (float32) or --bits 4/8 (quantized) on a CPU")


def shape_pair(shape: str, bits: int, layers: int | None = None, vocab: int | None = None,
               experts: int | None = None, seed: int = 0) -> tuple[Bundle, str]:
    """A random pair of a preset's shape in the given form, and a line naming it."""
    check_shape_args(shape, bits)
    bundle = random_pair(shape, bits=16 if bits == 32 else bits, layers=layers, vocab=vocab, experts=experts,
                         seed=seed)
    if bits == 32:
        for module in (bundle.target, bundle.drafter):
            to_float32(module)
    args = bundle.target.args
    cut = f", {args.num_hidden_layers} layers" if layers is not None else ""
    cut += f", vocab {args.vocab_size}" if vocab is not None else ""
    cut += f", {args.num_experts} experts" if experts is not None else ""
    return bundle, f"random {shape} pair ({dtype_name(bits)}{cut}; V = {args.vocab_size})"


def to_float32(module: nn.Module) -> None:
    """Cast every bfloat16 parameter to float32, largest first, dropping each bfloat16 tensor as soon as its copy
    is in place: the peak stays at about the float32 model's size."""
    params = {k: v for k, v in tree_flatten(module.parameters()) if v.dtype == mx.bfloat16}
    for name in sorted(params, key=lambda k: -params[k].size):
        cast = params.pop(name).astype(mx.float32)
        mx.eval(cast)
        module.load_weights([(name, cast)], strict=False)
        del cast
        mx.clear_cache()


def converted(bundle: Bundle, bits: int, recipe: str = "mixed") -> Bundle:
    """The bundle's bfloat16 pair in another form, as a new pair (the bundle itself for 16): quantized tensor by
    tensor with the converter's recipe (what `random_pair(bits=...)` makes, sharing the bfloat16 drafter), or a
    float32 copy of target and drafter (32). A second random pair without generating its values again."""
    if bits == 16:
        return bundle
    target = Model(bundle.target.args)
    drafter = bundle.drafter
    if bits == 32:
        target.load_weights([(k, v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
                             for k, v in tree_flatten(bundle.target.parameters())], strict=True)
        drafter = Drafter(drafter.args)
        drafter.load_weights([(k, v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
                              for k, v in tree_flatten(bundle.drafter.parameters())], strict=True)
    else:
        quantizable = set(quantizable_modules(target))
        plan = target_plan(target, recipe, bits, GROUP_SIZE)
        apply_plan(target, plan)  # lazy: replaced below before anything evaluates it
        for key, w in tree_flatten(bundle.target.parameters()):
            out = transform(key, w, plan, quantizable, mx.bfloat16)
            mx.eval(out)
            target.load_weights(list(out.items()), strict=False)
    materialize(target, drafter)
    return Bundle(target, drafter, None, bundle.config, bundle.generation, bundle.path)


# --- mlx-lm ---------------------------------------------------------------------------------------------------


def mlx_lm_model(bundle: Bundle) -> nn.Module:
    """mlx-lm's `gemma4_text.Model` holding the bundle's target arrays (shared, not copied)."""
    from mlx_lm.models import gemma4_text

    model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(bundle.target.args.to_dict()))
    quantized = {path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
                 for path, m in bundle.target.named_modules() if hasattr(m, "scales") and hasattr(m, "bits")}
    if quantized:
        nn.quantize(model, class_predicate=lambda path, _m: quantized.get(path, False))
    model.load_weights(tree_flatten(bundle.target.parameters()), strict=True)
    mx.eval(model.parameters())
    return model


def mlx_lm_generate(model: nn.Module, prompt: list[int], max_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """mlx-lm's plain greedy decoding: (tokens, seconds after the first token)."""
    from mlx_lm.generate import generate_step, generation_stream, wired_limit

    tokens, first = [], None
    with wired_limit(model, [generation_stream]):
        steps = generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=max_tokens,
                              prompt_cache=model.make_cache())
        for token, _ in steps:
            tokens.append(int(token))
            first = first or time.perf_counter()
            if token in eos or len(tokens) >= max_tokens:
                break
    return tokens, time.perf_counter() - first


class MlxLmPlain:
    """The bundle's target as mlx-lm's model: `run` has the shape of bench's `Mode.measure`."""

    def __init__(self, bundle: Bundle):
        self.model = mlx_lm_model(bundle)
        self.eos = set(bundle.generation.eos_token_ids)
        mlx_lm_generate(self.model, [1, 2, 3], 4, self.eos)  # warm-up

    def run(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, None, list[list[int]]]:
        """Greedy decoding of each prompt: (tokens/s, None, outputs)."""
        outputs, seconds = [], 0.0
        for prompt in prompts:
            tokens, s = mlx_lm_generate(self.model, prompt, max_tokens, self.eos)
            outputs.append(tokens)
            seconds += s
        return sum(map(len, outputs)) / seconds, None, outputs


def mlx_lm_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("mlx-lm")
