"""Token sequences for drafter distillation: read a dataset file, cut it into fixed-length chunks, batch them.

Formats: a `.txt` file is one document; a `.jsonl` file holds one JSON object per line, either
`{"text": "..."}` (tokenized with the target's tokenizer) or `{"tokens": [ids, ...]}` (pre-tokenized, used as is).
Each document is cut into non-overlapping chunks of `length` tokens and the remainder dropped. Text chunks all start
with the tokenizer's BOS token (chunk = BOS + the next `length - 1` tokens), so every training context looks like
the start of a prompt, as contexts do in decoding. Batches are drawn with a generator seeded by (seed, step): a run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np


def read_documents(path: Path) -> Iterator[tuple[str, str | list[int]]]:
    """Yield (where, text or token ids) for each document of a .txt or .jsonl file."""
    if path.suffix == ".txt":
        yield str(path), path.read_text(encoding="utf-8")
        return
    if path.suffix != ".jsonl":
        raise ValueError(f"dataset {path}: expected a .txt file or a .jsonl file with 'text' or 'tokens' fields")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"dataset {where}: not valid JSON ({e})") from e
            if not isinstance(record, dict) or not ({"text", "tokens"} & record.keys()):
                raise ValueError(f"dataset {where}: each line needs a 'text' (string) or 'tokens' (ids) field")
            yield where, record["tokens"] if "tokens" in record else record["text"]


def _token_ids(where: str, doc: str | list[int], tokenizer, vocab_size: int) -> tuple[list[int], bool]:
    """(ids, is_text) of one document; ids checked against the target's vocabulary."""
    if isinstance(doc, str):
        if tokenizer is None:
            raise ValueError(
                f"dataset {where}: the target has no tokenizer files, so text cannot be tokenized; add the "
                "tokenizer to the target folder or pass a .jsonl file with pre-tokenized 'tokens' lists"
            )
        return list(tokenizer.encode(doc)), True
    if not isinstance(doc, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in doc):
        raise ValueError(f"dataset {where}: 'tokens' must be a list of ids in [0, {vocab_size})")
    return doc, False


def chunk(ids: list[int], length: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping chunks of `length` ids; with `bos`, each chunk is BOS + `length - 1` document ids."""
    if bos is None:
        return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    body = ids[1:] if ids and ids[0] == bos else ids
    n = length - 1
    return [[bos] + body[i : i + n] for i in range(0, len(body) - n + 1, n)]


def load_sequences(path: str | Path, tokenizer, length: int, vocab_size: int) -> np.ndarray:
    """All chunks of `length` tokens in the dataset, (N, length) int32.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad format, or no document yields a single chunk of `length` tokens.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist (pass a .txt or .jsonl file)")
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    chunks, documents = [], 0
    for where, doc in read_documents(path):
        ids, is_text = _token_ids(where, doc, tokenizer, vocab_size)
        chunks += chunk(ids, length, bos if is_text else None)
        documents += 1
    if not chunks:
        raise ValueError(
            f"dataset {path} has no usable sequence: {documents} document(s), none with at least {length} tokens "
            "(seq_len + unroll); add text or lower --seq-len"
        )
    return np.array(chunks, dtype=np.int32)


def split_held_out(sequences: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out): a seeded shuffle; at least one sequence on each side when fraction > 0 and N >= 2."""
    order = np.random.default_rng(seed).permutation(len(sequences))
    n_held = 0
    if fraction > 0 and len(sequences) >= 2:
        n_held = min(len(sequences) - 1, max(1, round(fraction * len(sequences))))
    return sequences[order[n_held:]], sequences[order[:n_held]]


def batch(train: np.ndarray, step: int, batch_size: int, seed: int) -> mx.array:
    """The batch of training step `step` (1-based), (batch_size, length) int32: a function of (seed, step) only."""
    rows = np.random.default_rng([seed, step]).integers(0, len(train), batch_size)
    return mx.array(train[rows])
