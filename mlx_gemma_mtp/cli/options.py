"""Flags shared by the subcommands (sampling, draft length) and the argparse types they use."""

from __future__ import annotations

import argparse
import json

from ..sampling import SamplerConfig


def draft_tokens(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected an integer or 'auto'") from None


def json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": true}}', "
                                         f"got {value!r}")
    return parsed


def add_sampling_arguments(p) -> None:
    """Sampling and draft-length flags, shared by `generate` and `chat` (read back by `sampler_from`)."""
    p.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-draft-tokens", type=draft_tokens, default=None,
                   help="draft length K, 0 for plain decoding, or 'auto' (default when a drafter is loaded)")


def sampler_from(args, bundle) -> SamplerConfig:
    """The flags' sampling settings; top-p/top-k from the checkpoint's generation_config unless given."""
    defaults = bundle.generation
    return SamplerConfig(
        temperature=args.temp,
        top_p=args.top_p if args.top_p is not None else (defaults.top_p or 1.0),
        top_k=args.top_k if args.top_k is not None else (defaults.top_k or 0),
        min_p=args.min_p,
        seed=args.seed,
    )


DTYPES = ("float32", "float16", "bfloat16")  # mlx.core's names
DEMO_NAME = "mlx-gemma-mtp-demo"  # the model id `serve` reports for the demo pair


def add_model_arguments(p) -> None:
    """--model (default: the offline demo pair), --draft and --dtype, shared by generate, chat and serve."""
    p.add_argument("--model", default=None,
                   help="local folder or hub id of a Gemma 4 checkpoint or bundle (default: the offline demo pair)")
    p.add_argument("--draft", default=None, help="folder or hub id of the matching gemma4_assistant drafter")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast the float weights (default: as stored; the demo pair: float32 on a CPU, whose "
                        "half-precision matmuls are slow)")


def load_model(args, group=None):
    """The bundle the flags name (sharded across `group` under mlx.launch)."""
    import mlx.core as mx

    from .. import load

    model, dtype = args.model, getattr(mx, args.dtype) if args.dtype else None
    if model is None:
        from ..demo import demo_dtype, demo_path

        model, dtype = demo_path(), dtype or demo_dtype()
    if group is None:
        return load(model, draft=args.draft, dtype=dtype)
    from ..distributed.load import load_sharded

    return load_sharded(model, args.draft, group, dtype)


def model_name(args) -> str:
    """The id a server reports: `--served-model-name`, else a local folder's name or the hub id as given."""
    from pathlib import Path

    if getattr(args, "served_model_name", None):
        return args.served_model_name
    if args.model is None:
        return DEMO_NAME
    path = Path(args.model).expanduser()
    return path.resolve().name if path.exists() else args.model
