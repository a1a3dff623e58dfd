"""OpenAI's `logprobs` objects from the tokens' log-probabilities (`GenerationResponse.logprobs`).

Chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`; completions (the legacy
shape): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`. Every generated token
is listed, so there are as many entries as `usage.completion_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..decode import GenerationResponse


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(responses: list[GenerationResponse], token_text: Callable[[int], str]) -> dict:
    content = []
    for r in responses:
        entry = _entry(token_text(r.token), r.logprobs.logprob)
        entry["top_logprobs"] = [_entry(token_text(t), lp) for t, lp in r.logprobs.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(responses: list[GenerationResponse], token_text: Callable[[int], str],
                        offset: int = 0) -> dict:
    """The legacy shape; `offset` is the text length before the first of `responses` (for `text_offset`)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for r in responses:
        text = token_text(r.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(r.logprobs.logprob)
        out["top_logprobs"].append({token_text(t): lp for t, lp in r.logprobs.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
