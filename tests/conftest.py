"""Shared fixtures: tiny HF checkpoints written by the tests (no network) and a tiny trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import hf_oracle as oracle
import pytest

from mlx_gemma_mtp.testing import tokenizer as gemma4_tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def edit_json(file: Path, edit) -> None:
    """Apply `edit` (a function that changes a dict in place) to a JSON file."""
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def write_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """Train a tiny BPE tokenizer (ids 0..5 are pad/eos/bos/unk/turn markers) and write HF tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "def speculative(draft, verify):\n    return verify(draft)\n",
        "The quick brown fox jumps over the lazy dog. Hello world! " * 3,
        "for i in range(10):\n    print(i * i)\n",
    ] * 20
    # no full byte alphabet: every id must fit the tiny models' vocabulary (bytes unseen in the corpus -> <unk>)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_pair(path: Path, kind: str = "e2b", ordered: bool = True, layout: str = "text", seed: int = 0,
               max_shard_size=None, tokenizer: bool = True):
    """HF target + assistant (drafter in `drafter/`) written to `path`; returns the torch models."""
    target = oracle.make_target(kind, seed=seed, layout=layout)
    assistant = oracle.make_assistant(target, seed=seed + 1, ordered_embeddings=ordered)
    oracle.save_target(target, str(path), max_shard_size=max_shard_size)
    oracle.save_assistant(assistant, str(path / "drafter"))
    if tokenizer:
        write_tokenizer(path)
    return target, assistant


@pytest.fixture(scope="session")
def pair_dir(tmp_path_factory):
    """Factory: (kind, ordered, layout) -> folder with an HF target, its drafter and a tokenizer (cached)."""
    made = {}

    def get(kind: str = "e2b", ordered: bool = True, layout: str = "text"):
        key = (kind, ordered, layout)
        if key not in made:
            path = tmp_path_factory.mktemp(f"{kind}-{ordered}-{layout}")
            made[key] = (path, *write_pair(path, kind, ordered, layout))
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_target():
    """Factory: kind -> the float32 HF text model (seed 0) that `target_dir` saves (the parity reference)."""
    made = {}

    def get(kind: str = "e2b"):
        if kind not in made:
            made[kind] = oracle.make_target(kind, seed=0, layout="text")
        return made[kind]

    return get


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory, hf_target):
    """Factory: (kind, layout, max_shard_size) -> folder with a saved HF target (no drafter, no tokenizer).

    The text weights do not depend on the layout, so `hf_target(kind)` is the reference for every folder.
    """
    made = {}

    def get(kind: str = "e2b", layout: str = "text", max_shard_size: str | None = "50KB") -> Path:
        key = (kind, layout, max_shard_size)
        if key not in made:
            model = hf_target(kind) if layout == "text" else oracle.make_target(kind, seed=0, layout=layout)
            path = tmp_path_factory.mktemp(f"target-{kind}-{layout}")
            oracle.save_target(model, str(path), max_shard_size=max_shard_size)
            made[key] = path
        return made[key]

    return get


@pytest.fixture(autouse=True, scope="session")
def _private_cost_cache(tmp_path_factory):
    """Keep auto draft-length cost measurements out of the user's ~/.cache during tests."""
    import os

    old = os.environ.get("MLX_GEMMA_MTP_CACHE")
    os.environ["MLX_GEMMA_MTP_CACHE"] = str(tmp_path_factory.mktemp("cost-cache"))
    yield
    if old is None:
        os.environ.pop("MLX_GEMMA_MTP_CACHE")
    else:
        os.environ["MLX_GEMMA_MTP_CACHE"] = old


# ------------------------------------------------------------------------------------------------------------
# A Gemma-4-like tokenizer: the released special tokens at their real ids, `add_bos_token` false, an SPM-style
# BPE (spaces as "▁", "\n" at 107), and chat templates with the E2B-style and 31B-style generation prompts.
# ------------------------------------------------------------------------------------------------------------

GEMMA4_EOS = [1, 106, 50]  # generation_config.json's; config.json says [1, 106]

# Written for these tests after the released templates' structure: BOS, an optional system turn that carries
# <|think|> when thinking is on, <|turn>role\n…<turn|>\n turns, earlier model turns with their thought spans
# stripped, and the generation prompt ('31b' adds the empty thought block when thinking is off).
GEMMA4_TEMPLATE = """{%- macro strip_thinking(text) -%}
{%- set ns = namespace(out='') -%}
{%- for part in text.split('<channel|>') -%}
{%- set ns.out = ns.out + (part.split('<|channel>')[0] if '<|channel>' in part else part) -%}
{%- endfor -%}
{{- ns.out | trim -}}
{%- endmacro -%}
{%- set enable_thinking = enable_thinking | default(false) -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{%- if enable_thinking or (messages and messages[0]['role'] == 'system') -%}
{{- '<|turn>system\\n' -}}
{%- if enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] | trim -}}
{%- set loop_messages = messages[1:] -%}
{%- endif -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for m in loop_messages -%}
{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
{{- '<|turn>' + role + '\\n' -}}
{%- if role == 'model' -%}{{- strip_thinking(m['content']) -}}{%- else -%}{{- m['content'] | trim -}}{%- endif -%}
{{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\\n' -}}
{%- if EMPTY_THOUGHT and not enable_thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}"""


# Google's E2B/E4B chat template verbatim (ollama/ollama model/renderers/testdata/gemma4_e2b_chat_template.jinja2):
# tool declarations, calls and responses as the released checkpoints render them (tests/test_server_tools.py).
GEMMA4_UPSTREAM_TEMPLATE = (Path(__file__).parent / "data" / "gemma4_e2b_chat_template.jinja").read_text()


def gemma4_template(style: str) -> str:
    """'e2b' (E2B/E4B generation prompt), '31b' (26B/31B: an empty thought block when thinking is off), or
    'upstream' (Google's released E2B template, with tools)."""
    if style == "upstream":
        return GEMMA4_UPSTREAM_TEMPLATE
    return GEMMA4_TEMPLATE.replace("EMPTY_THOUGHT", "true" if style == "31b" else "false")


def write_gemma4_tokenizer(path: Path, style: str = "e2b", template_file: bool = True, vocab_size: int = 256) -> None:
    """HF tokenizer files shaped like Gemma 4's (ids < `vocab_size`, so the tiny models can read every id)."""
    gemma4_tokenizer.write_gemma4_tokenizer(path, vocab_size, gemma4_template(style), template_file)
