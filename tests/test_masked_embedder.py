"""The clustered LM head of the E2B/E4B drafters (`models/masked_embedder.py`) against HF transformers'
`Gemma4AssistantMaskedEmbedder`, on the same post-norm states `y`: candidate ids and logits, the vocabulary-wide
output with HF's fill rule, the argmax fast path, `token_ordering` handling and a quantized LM head."""

from __future__ import annotations

import hf_oracle as oracle
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx import nn

import mlx_gemma_mtp
from mlx_gemma_mtp.models.masked_embedder import MaskedEmbedder

TOL = 1e-5  # float32 max-abs-diff of logits |x| <~ 10 from one dot product of length 32


@pytest.fixture(scope="module")
def pair(pair_dir):
    """kind -> (our drafter in float32, HF assistant), both from the same saved folder."""
    made = {}

    def get(kind: str):
        if kind not in made:
            path, _, assistant = pair_dir(kind, True)
            made[kind] = (mlx_gemma_mtp.load(path, dtype=mx.float32).drafter, assistant)
        return made[kind]

    return get


def states(seed: int, hidden_size: int, shape=(2, 3)) -> np.ndarray:
    """Random post-norm drafter states (B, T, Hd) at the scale the final norm gives them."""
    return (np.random.default_rng(seed).standard_normal((*shape, hidden_size)) * 4.0).astype(np.float32)


@pytest.mark.parametrize("kind", ["e2b", "e4b"])
@pytest.mark.parametrize("seed", [0, 1])
def test_candidates_match_hf(kind, seed, pair):
    drafter, assistant = pair(kind)
    y = states(seed, drafter.args.text.hidden_size)
    ids, logits = drafter.candidates(mx.array(y))
    ref_ids, ref_logits = oracle.masked_embedder_candidates(assistant, torch.from_numpy(y))
    ids, logits = np.array(ids), np.array(logits)
    assert ids.dtype == np.int32 and ids.shape == tuple(ref_ids.shape) == (2, 3, 4 * 16)
    for b in range(2):
        for t in range(3):  # the same set of ids (cluster order may differ), each with the same logit
            ours, ref = np.argsort(ids[b, t]), ref_ids[b, t].argsort()
            assert np.array_equal(ids[b, t][ours], ref_ids[b, t][ref].numpy())
            assert np.abs(logits[b, t][ours] - ref_logits[b, t][ref].numpy()).max() <= TOL


@pytest.mark.parametrize("kind", ["e2b", "e4b"])
def test_full_logits_and_argmax_match_hf(kind, pair):
    drafter, assistant = pair(kind)
    me = drafter.masked_embedding
    y = states(2, drafter.args.text.hidden_size)
    with torch.no_grad():
        ref = assistant.masked_embedding(torch.from_numpy(y), assistant.lm_head.weight).numpy()
    ours = np.array(me.full_logits(mx.array(y), drafter.model.embed_tokens, drafter.args.text.vocab_size))
    assert ours.shape == ref.shape == (2, 3, 256)
    assert np.abs(ours - ref).max() <= TOL
    # one fill value for the whole call (HF's `.min().item() - 1`), outside every row's candidates
    fill = ref.min()
    assert np.isclose(ours.min(), fill) and ((ours == ours.min()).sum(-1) == 256 - 64).all()
    top = np.array(me.argmax(mx.array(y), drafter.model.embed_tokens))
    assert np.array_equal(top, ref.argmax(-1)) and np.array_equal(top, ours.argmax(-1))


def test_token_ordering_maps_clusters_to_canonical_ids():
    """Cluster c holds token_ordering[c*n:(c+1)*n]; only the top-k clusters' rows are scored."""
    V, C, Hd = 16, 4, 8
    me = MaskedEmbedder(Hd, V, C, top_k=1)
    me.token_ordering = mx.array([3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14], dtype=mx.int32)
    me.centroids.weight = mx.eye(C, Hd)
    head = nn.Embedding(V, Hd)
    head.weight = mx.random.normal((V, Hd), key=mx.random.key(0))
    y = mx.zeros((1, 1, Hd)).at[0, 0, 2].add(1.0)  # scores cluster 2 highest
    ids, logits = me.candidates(y, head)
    assert ids.tolist() == [[[1, 5, 9, 13]]]
    assert mx.allclose(logits, (head.weight[ids[0, 0]] @ y[0, 0])[None, None])
    full = me.full_logits(y, head, V)
    assert mx.argmax(full, axis=-1).item() == me.argmax(y, head).item() == ids[0, 0, mx.argmax(logits)].item()


def test_vocab_must_split_into_clusters():
    with pytest.raises(ValueError, match="256.*24"):
        MaskedEmbedder(32, 256, 24, 4)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_token_ordering_stays_int32(dtype, tmp_path):
    """Ids above 256 are not representable in bfloat16 (pitfall 25): a 512-token vocabulary shows corruption."""
    target = oracle.make_target("e2b", seed=0, vocab_size=512)
    assistant = oracle.make_assistant(target, seed=1, ordered_embeddings=True)
    oracle.save_target(target, str(tmp_path))
    oracle.save_assistant(assistant, str(tmp_path / "drafter"))
    drafter = mlx_gemma_mtp.load(tmp_path, dtype=dtype).drafter
    ordering = drafter.masked_embedding.token_ordering
    assert ordering.dtype == mx.int32
    assert ordering.tolist() == assistant.masked_embedding.token_ordering.tolist()
    assert drafter.masked_embedding.centroids.weight.dtype == dtype
    y = mx.array(states(4, drafter.args.text.hidden_size)).astype(dtype)
    ids = drafter.candidates(y)[0]
    assert ids.dtype == mx.int32 and int(ids.max()) >= 256


def test_sanitize_casts_token_ordering_and_is_idempotent(pair):
    drafter, _ = pair("e2b")
    raw = {
        "masked_embedding.token_ordering": mx.arange(256, dtype=mx.int64),
        "lm_head.weight": mx.zeros((256, 32)),
        "model.rotary_emb.sliding_attention_inv_freq": mx.zeros((8,)),
        "model.norm.weight": mx.ones((32,)),
    }
    once = drafter.sanitize(raw)
    assert sorted(once) == ["masked_embedding.token_ordering", "model.norm.weight"]
    assert once["masked_embedding.token_ordering"].dtype == mx.int32
    twice = drafter.sanitize(once)
    assert once.keys() == twice.keys() and all(mx.array_equal(once[k], twice[k]) for k in once)


def test_quantized_head_gathers_dequantized_rows(pair):
    """With a quantized LM head only candidate rows are gathered; they equal the dequantized weight's rows."""
    drafter, _ = pair("e2b")
    me, head = drafter.masked_embedding, drafter.model.embed_tokens
    q = nn.QuantizedEmbedding.from_embedding(head, group_size=32, bits=8)
    dense = nn.Embedding(*head.weight.shape)
    dense.weight = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=8)
    y = mx.array(states(3, drafter.args.text.hidden_size))
    ids_q, logits_q = me.candidates(y, q)
    ids_d, logits_d = me.candidates(y, dense)
    assert mx.array_equal(ids_q, ids_d)
    assert mx.abs(logits_q - logits_d).max().item() <= TOL
    assert mx.array_equal(me.argmax(y, q), mx.argmax(me.full_logits(y, dense, 256), axis=-1))
