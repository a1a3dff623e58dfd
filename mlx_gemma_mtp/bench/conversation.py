"""Time to first token of each turn of a growing conversation, with and without the prompt cache, in one run:
`python -m mlx_gemma_mtp.bench.conversation` (the demo pair by default).

Each turn's prompt is the previous prompt, the model's answer and a new "user" chunk (held-out stdlib code for the
demo pair), as a chat front end re-sends it. Both modes run the same turns alternately; the answers must be equal
(the cache's exactness), and the script raises if they are not. `--alternate` instead runs two conversations
taking turns, as a server sees them, through `PromptCaches` of one entry and of two: per turn, the time to first
token and the prompt tokens reused.
"""

from __future__ import annotations

import argparse
import time

from .. import PromptCache, load, stream_generate
from ..prompt_cache import PromptCaches
from .decoding import demo_prompts


def first_token_time(bundle, prompt: list[int], max_tokens: int, num_draft_tokens, cache) -> tuple[float, list]:
    """Seconds to the first generated token (prefill included), and the turn's tokens."""
    tic = time.perf_counter()
    first, tokens = None, []
    for r in stream_generate(bundle, prompt, max_tokens=max_tokens, num_draft_tokens=num_draft_tokens,
                             prompt_cache=cache):
        first = first if first is not None else time.perf_counter() - tic
        tokens.append(r.token)
    return first, tokens


def run(bundle, chunks: list[list[int]], max_tokens: int, num_draft_tokens) -> list[tuple[int, float, float, int]]:
    """Per turn: (prompt tokens, TTFT without a cache, TTFT with one, prompt tokens the cache reused)."""
    cache, prompt, rows = PromptCache(), [], []
    for chunk in chunks:
        prompt = prompt + chunk
        fresh, answer = first_token_time(bundle, prompt, max_tokens, num_draft_tokens, None)
        cached, again = first_token_time(bundle, prompt, max_tokens, num_draft_tokens, cache)
        if again != answer:
            raise RuntimeError(f"turn at {len(prompt)} prompt tokens: the cached turn differs from a fresh run")
        rows.append((len(prompt), fresh, cached, cache.reused))
        prompt = prompt + answer
    return rows


def alternate(bundle, chunks: list[list[int]], max_tokens: int, num_draft_tokens) -> list[tuple]:
    """Two conversations taking turns (even chunks build one, odd chunks the other), through a pool of one entry
    and a pool of two: per turn (conversation, prompt tokens, TTFT one entry, TTFT two, reused one, reused two)."""
    pools, prompts, rows = (PromptCaches(1), PromptCaches(2)), [[], []], []
    for turn, chunk in enumerate(chunks):
        i = turn % 2
        prompts[i] = prompts[i] + chunk
        results = []
        for pool in pools:
            cache = pool.for_prompt(prompts[i])
            results.append((*first_token_time(bundle, prompts[i], max_tokens, num_draft_tokens, cache), cache.reused))
        (one, answer, reused_one), (two, again, reused_two) = results
        if again != answer:
            raise RuntimeError(f"turn {turn + 1}: the two pools gave different answers")
        rows.append((i + 1, len(prompts[i]), one, two, reused_one, reused_two))
        prompts[i] = prompts[i] + answer
    return rows


def format_alternating(rows) -> str:
    lines = ["turn  conversation  prompt tokens  TTFT 1 entry (ms)  TTFT 2 entries (ms)  speedup  reused (1 / 2)"]
    for t, (i, n, one, two, r1, r2) in enumerate(rows, start=1):
        lines.append(f"{t:4d}  {i:12d}  {n:13d}  {one * 1e3:17.1f}  {two * 1e3:19.1f}  {one / two:6.1f}x  "
                     f"{r1} / {r2}")
    return "\n".join(lines)


def format_rows(rows) -> str:
    lines = ["turn  prompt tokens  TTFT fresh (ms)  TTFT cached (ms)  speedup  reused tokens"]
    for i, (n, fresh, cached, reused) in enumerate(rows, start=1):
        lines.append(f"{i:4d}  {n:13d}  {fresh * 1e3:15.1f}  {cached * 1e3:16.1f}  {fresh / cached:6.1f}x  "
                     f"{reused:13d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo pair")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=320, help="new user tokens per turn")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length per turn")
    parser.add_argument("--num-draft-tokens", default="auto")
    parser.add_argument("--alternate", action="store_true",
                        help="two conversations taking turns, through a prompt cache of one entry and of two")
    args = parser.parse_args(argv)
    from ..demo import demo_dtype, demo_path

    bundle = load(args.model or demo_path(), dtype=None if args.model else demo_dtype())
    if bundle.tokenizer is None:
        raise SystemExit("the model has no tokenizer: the conversation is built from held-out text")
    chunks = demo_prompts(bundle, args.turns, args.turn_tokens)
    k = args.num_draft_tokens if args.num_draft_tokens == "auto" else int(args.num_draft_tokens)
    if args.alternate:
        rows = alternate(bundle, chunks, args.max_tokens, k)
        print(f"two conversations taking turns, {len(rows)} turns, {args.turn_tokens} new tokens + a "
              f"{args.max_tokens}-token answer per turn, num_draft_tokens={k}; both pools give the same answers")
        print(format_alternating(rows))
        return
    rows = run(bundle, chunks, args.max_tokens, k)
    print(f"conversation of {len(rows)} turns, {args.turn_tokens} new tokens + a {args.max_tokens}-token answer "
          f"per turn, num_draft_tokens={k}; every cached turn equals its fresh run")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
