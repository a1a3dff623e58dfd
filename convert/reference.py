"""Float32 reference logits of a source checkpoint, computed layer by layer from its files.

The quality report compares a converted bundle with the float32 computation of its source weights. Loading the
whole source in float32 costs 4 bytes per parameter (18 GB for E2B, 124 GB for 31B), so the reference runs the
prompts through one decoder layer at a time instead: each layer's tensors are read, cast to float32, applied to
every prompt's hidden states and dropped. Only the prompts' rows of the token and per-layer embedding tables are
read, and the tied head runs over the vocabulary in row slices. The arithmetic is the model's own
(`Gemma4TextModel.embed` / `per_layer_inputs`, `DecoderLayer`, the final norm and softcap of `Model`), so the
logits equal `load(source, dtype=mx.float32).target(ids)` up to float rounding; peak memory is one layer (or one
head slice) in float32 plus the prompts' activations.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..load import read_config, safetensors_files, safetensors_header
from ..models.config import ModelArgs
from ..models.gemma4_text import Model, canonical_key, logit_softcap
from .shards import SAFETENSORS_DTYPES, data_start, read_rows

HEAD_SLICE_BYTES = 256 << 20  # float32 bytes of the embedding rows one head slice multiplies by


class SourceTensors:
    """The text-model tensors of a checkpoint by sanitized name, read on demand (never all at once)."""

    def __init__(self, path: Path, model: Model):
        self.model = model
        self.where: dict[str, tuple[Path, str, dict, int]] = {}  # key -> (file, stored name, header entry, start)
        for file in safetensors_files(path):
            header, start = safetensors_header(file), data_start(file)
            for name, info in header.items():
                if name == "__metadata__" or canonical_key(name) is None:
                    continue
                placeholder = mx.zeros(info["shape"], SAFETENSORS_DTYPES[info["dtype"]])  # lazy: not allocated
                for key in model.sanitize({name: placeholder}):
                    self.where[key] = (file, name, info, start)

    def load(self, prefix: str) -> list[tuple[str, mx.array]]:
        """The float32 tensors whose sanitized names start with `prefix`, read and cast one at a time."""
        by_file: dict[Path, set[str]] = {}
        for key, (file, name, _, _) in self.where.items():
            if key.startswith(prefix):
                by_file.setdefault(file, set()).add(name)
        out = []
        for file, names in sorted(by_file.items()):
            stored = mx.load(str(file))  # lazy: each file's header is parsed once, tensors are read when cast
            for name in sorted(names):  # popped: a source tensor is dropped once its float32 copy exists
                for key, w in self.model.sanitize({name: stored.pop(name)}).items():
                    w = w.astype(mx.float32)
                    mx.eval(w)
                    out.append((key, w))
        return out

    def rows(self, key: str, ids: list[int]) -> mx.array:
        """Rows `ids` of an embedding table in float32, reading only those rows."""
        file, _, info, start = self.where[key]
        return mx.concatenate([read_rows(file, info, i, i + 1, start).astype(mx.float32) for i in ids])

    def head(self, h: mx.array) -> mx.array:
        """`h @ embed_tokens.weight.T` (the tied head), over the vocabulary in row slices; (..., V) float32."""
        file, _, info, start = self.where["model.embed_tokens.weight"]
        V, H = info["shape"]
        step = max(1, HEAD_SLICE_BYTES // (4 * H))
        parts = []
        for v0 in range(0, V, step):
            w = read_rows(file, info, v0, min(V, v0 + step), start).astype(mx.float32)
            parts.append(h @ w.T)
            mx.eval(parts[-1])
        return mx.concatenate(parts, axis=-1)


def reference_logits(path: Path, prompts: list[list[int]]) -> list[mx.array]:
    """Float32 logits (T, V), softcapped as the model's, of each prompt under the checkpoint at `path`."""
    args = ModelArgs.from_dict(read_config(path))
    model = Model(args)  # lazily initialised: its own random weights are never evaluated
    m, source = model.model, SourceTensors(path, model)
    vocab = sorted({t for p in prompts for t in p})
    local = {t: i for i, t in enumerate(vocab)}  # prompt ids -> rows of the gathered embedding rows
    m.embed_tokens.weight = source.rows("model.embed_tokens.weight", vocab)
    if args.hidden_size_per_layer_input:
        m.embed_tokens_per_layer.weight = source.rows("model.embed_tokens_per_layer.weight", vocab)
        model.load_weights(source.load("model.per_layer_"), strict=False)
    states = []  # per prompt: [hidden (1, T, H), per-layer inputs, {layer type: last K/V}, masks]
    for p in prompts:
        x = mx.array([[local[t] for t in p]])
        h = m.embed(x)
        ple = m.per_layer_inputs(x, h) if args.hidden_size_per_layer_input else None
        mx.eval(h, ple)
        states.append([h, ple, {}, {}])
    for i in range(args.num_hidden_layers):
        model.load_weights(source.load(f"model.layers.{i}."), strict=False)
        layer, layer_type = m.layers[i], args.layer_types[i]
        for s in states:
            h, ple, shared_by_type, masks = s
            shared = shared_by_type[layer_type] if i >= args.first_kv_shared_layer else None
            s[0], shared_by_type[layer_type] = layer(h, None if ple is None else ple[:, :, i], 0, None, shared,
                                                     masks=masks)
            mx.eval(s[0], shared_by_type[layer_type][:2])  # (K, V, start)
        m.layers[i] = None  # drops this layer's float32 weights before the next layer is read
        mx.clear_cache()
    model.load_weights(source.load("model.norm."), strict=False)
    cap = args.final_logit_softcapping
    out = []
    for h, *_ in states:
        logits = source.head(m.norm(h))[0]
        out.append(logit_softcap(cap, logits) if cap else logits)
        mx.eval(out[-1])
    return out
