"""A Gemma-4-like tokenizer for random-weight checkpoints (the tests, the real-size script `scale.py`).

The released special tokens at their real ids, `add_bos_token` false, an SPM-style BPE (spaces as "▁", "\n" at
107, characters and a few merges after it) and a placeholder for every other id, so a random model's output of
any id decodes. Imports only the standard library until called (`scale.py` must stay a small process).
"""

from __future__ import annotations

import json
from pathlib import Path

GEMMA4_SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>",
                  49: "<tool_call|>", 50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>",
                  100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>"}
# multimodal placeholders at their released ids (a vocabulary too small for them passes its own `media` ids)
MEDIA_SPECIAL = {255999: "<|image>", 256000: "<|audio>", 258880: "<|image|>", 258881: "<|audio|>",
                 258882: "<image|>", 258883: "<audio|>", 258884: "<|video|>"}
CHARS = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?':;-()=_<>[]{}\"#*/+")
MERGES = [("t", "h"), ("th", "e"), ("▁", "the"), ("u", "s"), ("us", "e"), ("use", "r"), ("m", "o"), ("mo", "d"),
          ("mod", "e"), ("mode", "l")]


def write_gemma4_tokenizer(path: Path, vocab_size: int, chat_template: str, template_file: bool = True,
                           media: dict[int, str] | None = None) -> None:
    """tokenizer.json and tokenizer_config.json into `path`, with `chat_template` in chat_template.jinja or, when
    not `template_file`, in tokenizer_config.json (checkpoints ship either). `media`: {id: placeholder token}
    (default: the released ids when the vocabulary holds them, else none)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    if media is None:
        media = MEDIA_SPECIAL if vocab_size > max(MEDIA_SPECIAL) else {}
    special = GEMMA4_SPECIAL | media
    by_id = {i: f"<unused{i}>" for i in range(vocab_size)} | special | {107: "\n"}
    by_id |= dict(enumerate(CHARS + ["".join(m) for m in MERGES], start=108))
    if len(by_id) != vocab_size:
        raise ValueError(f"a Gemma-4-like tokenizer needs a vocabulary of at least {len(by_id)}, not {vocab_size}")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in by_id.items()}, merges=MERGES, unk_token="<unk>",
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False}
    if template_file:
        (path / "chat_template.jinja").write_text(chat_template)
    else:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
