"""Structured output (constraint.py): answers follow a JSON schema, and MTP under a schema is exact: greedy MTP equals
greedy plain decoding under the same schema token for token, drafts the grammar forbids are never accepted."""

from __future__ import annotations

import json
import shutil

import live_server
import llguidance
import mlx.core as mx
import numpy as np
import pytest
from conftest import write_gemma4_tokenizer

import mlx_gemma_mtp
from mlx_gemma_mtp import SamplerConfig, stream_generate

PROMPT = "Answer in JSON: "
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}


@pytest.fixture(scope="module")
def bundle(pair_dir, tmp_path_factory):
    """The tiny pair with a Gemma-4-like tokenizer (JSON's characters are in its vocabulary)."""
    path = tmp_path_factory.mktemp("json-pair")
    shutil.copytree(pair_dir("e2b")[0], path, dirs_exist_ok=True)
    write_gemma4_tokenizer(path, "e2b")
    return mlx_gemma_mtp.load(path)


def _valid_prefix(bundle, schema: dict, tokens: list[int]) -> bool:
    """Whether a fresh matcher of `schema` accepts every one of `tokens`."""
    constraint = bundle.state.constraint(bundle.tokenizer, schema, list(bundle.generation.eos_token_ids) or [1])
    return constraint.matcher.validate_tokens(tokens) == len(tokens)


@pytest.mark.parametrize("schema", [{"type": "object"}, FLAG,
                                    {"type": "object", "properties": {"n": {"type": "integer"},
                                                                      "s": {"type": "string"}}}])
def test_greedy_mtp_under_a_schema_equals_greedy_plain(bundle, schema):
    plain = [r.token for r in stream_generate(bundle, PROMPT, 40, num_draft_tokens=0, json_schema=schema)]
    assert _valid_prefix(bundle, schema, [t for t in plain if t not in bundle.generation.eos_token_ids])
    for k in (1, 3, 6, "auto"):
        mtp = list(stream_generate(bundle, PROMPT, 40, num_draft_tokens=k, json_schema=schema))
        assert [r.token for r in mtp] == plain, k


def test_a_closed_schema_gives_parseable_json(bundle):
    for k in (0, 2):
        text = mlx_gemma_mtp.generate(bundle, PROMPT, max_tokens=60, num_draft_tokens=k, json_schema=FLAG)
        assert set(json.loads(text)) == {"ok"}


def test_drafts_the_grammar_forbids_are_never_verified(bundle):
    """A proposer that drafts a forbidden token after two right ones: the rounds still equal plain decoding."""
    plain = [r.token for r in stream_generate(bundle, PROMPT, 30, num_draft_tokens=0, json_schema=FLAG)]
    reference = bundle.tokenizer.encode(PROMPT) + plain + [0] * 16
    bad = bundle.tokenizer.encode("zzz")[-1]

    def propose(last, hidden, windows, position, k):
        drafts = [reference[i] if (i - position) % 3 else bad for i in range(position + 1, position + 1 + k)]
        return mx.array(drafts, mx.int32), None

    out = list(stream_generate(bundle, PROMPT, 30, num_draft_tokens=4, proposer=propose, json_schema=FLAG))
    assert [r.token for r in out] == plain and any(r.from_draft for r in out)


def test_sampled_answers_follow_the_schema(bundle):
    for k in (0, 3):
        for seed in range(3):
            rs = list(stream_generate(bundle, PROMPT, 40, SamplerConfig(temperature=1.0, seed=seed), k,
                                      json_schema={"type": "object"}))
            tokens = [r.token for r in rs if r.token not in bundle.generation.eos_token_ids]
            assert _valid_prefix(bundle, {"type": "object"}, tokens)


def test_bad_schemas_are_refused(bundle):
    with pytest.raises(ValueError, match="json_schema must be a dict"):
        next(stream_generate(bundle, PROMPT, 4, json_schema="object"))
    with pytest.raises(ValueError, match="unsupported JSON schema"):
        next(stream_generate(bundle, PROMPT, 4, json_schema={"type": "no-such-type"}))
    assert llguidance.LLMatcher is not None


# ---- through the server's response_format ---------------------------------------------------------------------

def test_response_format_through_the_official_client(bundle):

    import openai


    server, thread = live_server.start(bundle, model_name="tiny", num_draft_tokens=3)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    messages = [{"role": "user", "content": "json please"}]
    try:
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as c:
            r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=60, temperature=0,
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "flag", "schema": FLAG}})
            assert set(json.loads(r.choices[0].message.content)) == {"ok"}
            assert r.choices[0].message.content == mlx_gemma_mtp.generate(bundle, messages, max_tokens=60,
                                                                          json_schema=FLAG)
            r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})  # not in its types
            assert r.choices[0].text == mlx_gemma_mtp.generate(bundle, PROMPT, max_tokens=30,
                                                               json_schema={"type": "object"}, num_draft_tokens=3)
            for bad in ({"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "yaml"},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}):
                with pytest.raises(openai.BadRequestError):
                    c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, response_format=bad)
    finally:
        live_server.stop(server, thread)


def test_constrained_benchmark_prints_mask_costs_and_checks_mtp_rows(capsys):
    from mlx_gemma_mtp.bench import constrained

    constrained.main(["--k", "2", "--max-tokens", "12", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "next-token mask (us)" in out and "verify masks, K = " in out
    for setting in ("free text", "JSON schema"):
        for mode in ("plain", "K=2", "K=auto"):
            assert f"{setting:12} {mode:6}" in out, (setting, mode)


def test_the_first_draft_of_every_round_is_one_the_grammar_allows(bundle, monkeypatch):
    """The drafter's first draft is chosen under the mask known when the round is queued: every drafting round
    verifies at least one draft (a random drafter unmasked mostly proposes forbidden tokens)."""
    from mlx_gemma_mtp.constraint import Constraint

    allowed, walk = [], Constraint._walk

    def counted(self, drafts, replacement):
        words, kept = walk(self, drafts, replacement)
        first_forbidden = next((i for i, t in enumerate(drafts) if i >= len(kept) or kept[i] != t), len(drafts))
        allowed.append((len(drafts), first_forbidden, self.matcher.is_stopped()))
        return words, kept

    monkeypatch.setattr(Constraint, "_walk", counted)
    for sampler in (SamplerConfig(), SamplerConfig(temperature=1.0, seed=2)):
        allowed.clear()
        list(stream_generate(bundle, PROMPT, 40, sampler, 3, json_schema={"type": "object"}))
        rounds = [(k, n) for k, n, done in allowed if not done]
        assert rounds and all(n >= 1 for k, n in rounds), rounds


def test_a_forbidden_draft_is_replaced_by_the_drafters_best_allowed_choice(bundle, monkeypatch):
    """Greedy: where a later draft is one the grammar forbids, the round verifies the drafter's best allowed
    alternative in its place (what drafting under the mask would have proposed), and the answer still equals
    plain decoding's token for token. (The tiny random drafter's best few choices are rarely JSON: it keeps
    them all here, a fresh load so that its draft graphs are traced with that.)"""
    from mlx_gemma_mtp import drafting
    from mlx_gemma_mtp.constraint import Constraint

    monkeypatch.setattr(drafting, "ALTERNATIVES", bundle.target.args.vocab_size)
    bundle = mlx_gemma_mtp.load(bundle.path)

    replaced, kept_drafts = [], Constraint.kept_drafts

    def spy(self, drafts, q, alternatives, lockstep=None):
        tokens, kept_q, masks = kept_drafts(self, drafts, q, alternatives, lockstep)
        proposed, kept = drafts.tolist(), tokens.tolist()
        if kept and kept[-1] != proposed[len(kept) - 1]:  # the last kept one replaced a forbidden draft
            assert kept[-1] in alternatives.tolist()[len(kept) - 1]
            replaced.append(kept)
        return tokens, kept_q, masks

    monkeypatch.setattr(Constraint, "kept_drafts", spy)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}
    plain = [r.token for r in stream_generate(bundle, PROMPT, 40, num_draft_tokens=0, json_schema=schema)]
    assert [r.token for r in stream_generate(bundle, PROMPT, 40, num_draft_tokens=4, json_schema=schema)] == plain
    assert replaced  # a random drafter proposes forbidden tokens often


def test_sampled_replacements_keep_the_answers_distribution():
    """Sampling: a forbidden draft redrawn from q restricted to the grammar (instead of dropped) is still judged
    against q restricted: at one position the answer is distributed as p either way."""
    from mlx_gemma_mtp.constraint import kept_draft_log_probs
    from mlx_gemma_mtp.sampling import speculative_accept

    n, rng = 100_000, np.random.default_rng(1)
    q, p, mask = np.array([0.25, 0.25, 0.5]), np.array([0.9, 0.1, 0.0]), np.array([True, True, False])
    drafts = rng.choice(3, size=n, p=q)
    redrawn = rng.choice(3, size=n, p=np.where(mask, q, 0) / q[mask].sum())
    drafts = np.where(mask[drafts], drafts, redrawn)
    log_q = kept_draft_log_probs(mx.log(mx.array(q, mx.float32))[None], mx.array(mask)[None])
    _, tokens = speculative_accept(mx.broadcast_to(mx.log(mx.array(p, mx.float32)), (n, 2, 3)),
                                   mx.broadcast_to(log_q, (n, 1, 3)), mx.array(drafts[:, None]), mx.random.key(2))
    assert np.bincount(np.array(tokens)[:, 0], minlength=3) / n == pytest.approx(p, abs=0.006)


def test_kept_drafts_are_judged_against_the_distribution_they_were_kept_from():
    """A draft the grammar forbids is dropped (the target then samples that position itself), so a kept draft is
    a draw from q given that it is allowed: the answer's distribution is p only when Leviathan's rule is given
    that distribution (with q itself the first token comes out 0.85 of the time, not 0.9)."""
    from mlx_gemma_mtp.constraint import kept_draft_log_probs
    from mlx_gemma_mtp.sampling import speculative_accept

    n = 100_000
    q, p, mask = np.array([0.25, 0.25, 0.5]), np.array([0.9, 0.1, 0.0]), np.array([True, True, False])
    drafts = np.random.default_rng(0).choice(3, size=n, p=q)
    kept = drafts[mask[drafts]]
    log_q = kept_draft_log_probs(mx.log(mx.array(q, mx.float32))[None], mx.array(mask)[None])  # (1, 3)
    _, tokens = speculative_accept(mx.broadcast_to(mx.log(mx.array(p, mx.float32)), (len(kept), 2, 3)),
                                   mx.broadcast_to(log_q, (len(kept), 1, 3)), mx.array(kept[:, None]),
                                   mx.random.key(1))
    counts = np.bincount(np.array(tokens)[:, 0], minlength=3) + (n - len(kept)) * p  # dropped: sampled from p
    assert counts / n == pytest.approx(p, abs=0.006)  # 5 sigma at n = 100,000


def test_sampled_rounds_verify_against_the_kept_drafts_distribution(bundle, monkeypatch):
    """Every sampled round under a grammar hands the acceptance rule q rows that are distributions over the
    tokens the grammar allows at that position (what `kept_draft_log_probs` makes)."""
    from mlx_gemma_mtp import speculative

    rows, accept = [], speculative.accept

    def spy(logits, drafts, q, sampler, key=None):
        if q is not None and drafts.size:
            rows.append((logits[: drafts.size], q))
        return accept(logits, drafts, q, sampler, key)

    monkeypatch.setattr(speculative, "accept", spy)
    for seed in range(3):
        list(stream_generate(bundle, PROMPT, 40, SamplerConfig(temperature=1.0, seed=seed), 3,
                             json_schema={"type": "object"}))
    assert rows
    for logits, q in rows:
        forbidden = mx.isinf(logits) & (logits < 0)  # the masked target's -inf
        assert mx.all(mx.where(forbidden, mx.isinf(q), True)).item()
        assert mx.allclose(mx.logsumexp(q, axis=-1), mx.zeros(q.shape[0]), atol=1e-5).item()
