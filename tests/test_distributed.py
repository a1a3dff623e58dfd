"""Tensor-parallel Gemma 4 (mlx_gemma_mtp/distributed.py, distributed_load.py).

The end-to-end tests launch two local ranks with MLX's ring backend (`mlx.launch -n 2 --backend ring`), as CI
does, on tiny float32 E2B-like (1 K/V head, PLE, KV-shared layers), 31B-like (K=V full layers) and MoE pairs:
greedy output, plain and MTP, equals the single-process output token for token; seeded sampling gives the same
tokens on both ranks; each rank holds and reads about half the weights. Sharding changes the order of float
additions (o_proj / down_proj / experts sum two halves), so logits agree to ~1e-5, not bit for bit: the
configurations are ones where that difference flips no greedy choice (checked here with the logits themselves).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import write_tokenizer
from distributed_models import KINDS, make_pair, target_config, write_pair
from mlx.utils import tree_flatten

from mlx_gemma_mtp import load
from mlx_gemma_mtp.decode import stream_generate
from mlx_gemma_mtp.distributed.load import load_sharded_target
from mlx_gemma_mtp.distributed.lockstep import Lockstep
from mlx_gemma_mtp.distributed.shard import kv_heads_for, shard, split_points, weight_bytes
from mlx_gemma_mtp.draft_length import LockstepDraftLength
from mlx_gemma_mtp.load import Bundle, GenerationDefaults
from mlx_gemma_mtp.models.config import ModelArgs
from mlx_gemma_mtp.models.gemma4_text import Model
from mlx_gemma_mtp.pair_state import PairState
from mlx_gemma_mtp.sampling import SamplerConfig

TESTS = Path(__file__).parent
BUNDLES = [*KINDS, "31b-q8"]  # the worker's runs
TIMEOUT = 420


class FakeGroup:
    """What `shard` asks of a group (no communication happens before a forward)."""

    def __init__(self, rank: int, size: int = 2):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _launcher() -> str:
    found = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
    if found is None or not mx.distributed.is_available():
        pytest.skip("mlx.launch / mx.distributed not available")
    return found


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def launch(*command: str, python: bool = True) -> subprocess.CompletedProcess:
    """Run `command` on two local ranks (ring backend); fails the test with both ranks' output on error."""
    args = [_launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair())]
    args += ["--python", sys.executable] if python else ["--"]
    done = subprocess.run([*args, *command], check=False, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"mlx.launch failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' reports of tests/distributed_worker.py over the three tiny pairs."""
    root = tmp_path_factory.mktemp("tp")
    folders = [str(write_pair(kind, root / kind)) for kind in KINDS]
    folders.append(str(write_pair("31b", root / "31b-q8", bits=8)))  # quantized layers split too
    out = root / "out"
    out.mkdir()
    launch(str(TESTS / "distributed_worker.py"), str(out), *folders)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("kind", BUNDLES)
def test_sharded_greedy_equals_single_process(ranks, kind):
    for report in ranks:
        got, ref = report[kind]["got"], report[kind]["ref"]
        assert report[kind]["max_logit_diff"] < 1e-4
        for name in ("plain", "mtp3", "auto", "oracle4"):
            assert got[name] == ref["plain"], name


@pytest.mark.parametrize("kind", BUNDLES)
def test_sampling_is_identical_on_both_ranks(ranks, kind):
    first, second = (report[kind]["got"] for report in ranks)
    for name in ("sampled_plain", "sampled_mtp2", "sampled_auto", "unseeded_mtp2"):
        assert first[name] == second[name], name
    # with a seed the draws are the single-process ones too (the logits agree to ~1e-5; no draw sits that close)
    for name in ("sampled_plain", "sampled_mtp2"):
        assert first[name] == ranks[0][kind]["ref"][name], name


@pytest.mark.parametrize("kind", BUNDLES)
def test_both_ranks_draft_alike(ranks, kind):
    """Same draft lengths round by round (auto included: K comes from rank 0's timings on both ranks)."""
    assert ranks[0][kind]["schedules"] == ranks[1][kind]["schedules"]
    if kind != "31b-q8":  # next to an 8-bit target the float32 drafter costs too much: auto decodes plainly
        assert ranks[0][kind]["schedules"]["auto"][0] > 0


@pytest.mark.parametrize("kind", BUNDLES)
def test_each_rank_holds_and_reads_about_half(ranks, kind):
    for report in ranks:
        r = report[kind]
        assert r["bytes_read"] == r["weight_bytes"]  # only this rank's slices were read from disk
        split = r["whole_bytes"] - r["replicated_bytes"]  # exactly half of every split tensor is this rank's
        assert r["weight_bytes"] - r["replicated_bytes"] == split // 2
        assert r["weight_bytes"] < 0.65 * r["whole_bytes"]  # tiny models: the replicated embedding weighs more


@pytest.mark.parametrize("kind", list(KINDS))
def test_shards_are_halves_of_the_weights(kind):
    """The two ranks' slices of every split tensor tile it; the split layers are exactly half per rank."""
    whole, _ = make_pair(kind)
    expected = dict(tree_flatten(whole.parameters()))
    parts, plans = [], []
    for rank in range(2):
        target, _ = make_pair(kind)
        plans.append(shard(target, FakeGroup(rank)))
        parts.append(dict(tree_flatten(target.parameters())))
    split = 0
    for name, w in expected.items():
        if name not in plans[0]:
            assert all(mx.array_equal(p[name], w) for p in parts), name  # replicated
            continue
        (axis, a0, b0), (_, a1, b1) = plans[0][name], plans[1][name]
        if (a0, b0) == (a1, b1):  # K/V heads both ranks' query heads read
            assert mx.array_equal(parts[0][name], w), name
            continue
        assert b0 == a1 and a0 == 0 and b1 == w.shape[axis], name
        assert mx.array_equal(mx.concatenate([parts[0][name], parts[1][name]], axis=axis), w), name
        split += w.nbytes
    assert weight_bytes(whole) - sum(p.nbytes for p in parts[0].values()) == split // 2


def test_head_counts_follow_the_shard():
    target, _ = make_pair("e2b")
    shard(target, FakeGroup(1))
    producers = set(target.producers.values())
    for i, layer in enumerate(target.layers):
        attn = layer.self_attn
        assert attn.n_heads == 2 and attn.n_kv_heads == 1  # one K/V head: both ranks project it
        assert attn.kv_slice is None
        assert isinstance(attn.o_proj, nn.ShardedToAllLinear) and isinstance(layer.mlp.down_proj,
                                                                             nn.ShardedToAllLinear)
        assert ("k_proj" in attn) == (i < target.args.first_kv_shared_layer)
        if i in producers:
            assert attn.k_proj.weight.shape[0] == attn.head_dim  # whole


def test_k_eq_v_producers_keep_every_kv_head():
    target, _ = make_pair("31b")
    shard(target, FakeGroup(1))
    for i, layer in enumerate(target.layers):
        attn, kv = layer.self_attn, target.args.layer_kv_heads[i]
        if i in target.producers.values():  # the drafter reads all K/V heads; attention uses this rank's
            assert attn.n_kv_heads == kv and attn.kv_slice == slice(kv // 2, kv)
        else:
            assert attn.n_kv_heads == kv // 2 and attn.kv_slice is None
        assert "v_proj" not in attn if target.args.layer_types[i] == "full_attention" else "v_proj" in attn


def test_quantized_experts_split_on_group_boundaries():
    """26B-A4B's 704-wide experts at group size 64: 11 groups split 5 / 6, never inside a group."""
    assert split_points(704, 2, 64) == [0, 320, 704]
    assert split_points(2112, 2, 64) == [0, 1024, 2112]
    with pytest.raises(ValueError, match="cannot split"):
        split_points(64, 2, 64)
    target = Model(ModelArgs.from_dict({**target_config("moe"), "moe_intermediate_size": 96}))  # 3 groups of 32
    nn.quantize(target, 32, 8, class_predicate=lambda p, m: p.endswith(("_proj", "down_proj")) and "self_attn" not in p)
    glu = target.layers[0].experts.switch_glu
    whole = glu.down_proj.scales
    plans = [shard(target, FakeGroup(0))]
    assert glu.down_proj.scales.shape == (*whole.shape[:-1], 1) and glu.gate_proj.weight.shape[1] == 32
    assert plans[0]["model.layers.0.experts.switch_glu.down_proj.weight"] == (2, 0, 8)  # 32 inputs x 8 bits / 32
    assert isinstance(target.layers[0].mlp.down_proj, nn.QuantizedShardedToAllLinear)


def test_kv_heads_for():
    assert kv_heads_for(4, 8, 8, 1) == (0, 1)  # E2B: every query head reads the one K/V head
    assert kv_heads_for(16, 32, 32, 4) == (2, 4)  # 31B full layers: 4 global K/V heads, 2 per rank
    assert kv_heads_for(2, 4, 8, 2) == (0, 1)  # 4 ranks over 2 K/V heads: pairs of ranks share one
    with pytest.raises(ValueError, match="do not map evenly"):
        kv_heads_for(0, 4, 12, 4)  # 3 ranks: 4 query heads straddle two groups of 3


def test_cli_generate_under_mlx_launch(tmp_path):
    """`mlx.launch -n 2 -- mlx-gemma-mtp generate` prints what one process prints, once (rank 0 only)."""
    folder = write_pair("e2b", tmp_path / "e2b")
    write_tokenizer(folder)
    cli = shutil.which("mlx-gemma-mtp", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("the mlx-gemma-mtp console script is not installed")
    args = ["generate", "--model", str(folder), "--prompt", "hello world", "--max-tokens", "10",
            "--no-chat-template", "--num-draft-tokens", "2"]
    single = subprocess.run([cli, *args], capture_output=True, text=True, timeout=TIMEOUT, check=True)
    both = launch(cli, *args, python=False)
    assert single.stdout.strip() and both.stdout.count(single.stdout.strip()) == 1
    assert both.stderr.count("MTP:") == 1  # the stats line of rank 0 only


def _post(port: int, path: str, body: dict, read: int | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read(read).decode() if read else response.read().decode()


def test_serve_under_mlx_launch(tmp_path):
    """Rank 0 serves, rank 1 follows each generation: answers equal one process's, also after a client left
    mid-stream (the sharded generation runs to its end on every rank, so the ranks stay in step)."""
    folder = write_pair("e2b", tmp_path / "e2b")
    write_tokenizer(folder)
    cli = shutil.which("mlx-gemma-mtp", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("the mlx-gemma-mtp console script is not installed")
    generate = [cli, "generate", "--model", str(folder), "--prompt", "hello world", "--max-tokens", "10",
                "--no-chat-template", "--num-draft-tokens", "2"]
    expected = subprocess.run(generate, capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
    port = _free_port_pair()
    serve = [_launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair()), "--", cli,
             "serve", "--model", str(folder), "--port", str(port), "--num-draft-tokens", "2"]
    # a session of its own: stopping it stops the ranks mlx.launch started too
    server = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        for _ in range(480):  # loading imports transformers for the tokenizer: slow on a busy machine
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        body = {"prompt": "hello world", "max_tokens": 10, "temperature": 0}
        first = json.loads(_post(port, "/v1/completions", body))["choices"][0]["text"]
        _post(port, "/v1/completions", {**body, "stream": True, "max_tokens": 40}, read=10)  # leaves early
        again = json.loads(_post(port, "/v1/completions", body))["choices"][0]["text"]
        assert first == again == expected.strip("\n")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_load_sharded_reads_this_ranks_slices(pair_dir, kind):
    """An HF-layout checkpoint (fused MoE gate_up_proj, multimodal prefixes) loads sharded: the two ranks' tensors
    tile the single-process ones."""
    path = pair_dir(kind)[0]
    expected = dict(tree_flatten(load(path).target.parameters()))
    ranks = [dict(tree_flatten(load_sharded_target(path, FakeGroup(r))[0].parameters())) for r in range(2)]
    assert ranks[0].keys() == expected.keys()
    for name, w in expected.items():
        a, b = ranks[0][name], ranks[1][name]
        if a.shape == w.shape:
            assert mx.array_equal(a, w) and mx.array_equal(b, w), name
        else:
            axis = next(i for i, (x, y) in enumerate(zip(a.shape, w.shape)) if x != y)
            assert mx.array_equal(mx.concatenate([a, b], axis=axis), w), name


def test_lockstep_hands_rank0_timings_to_the_policy():
    """Timings travel with the next `agree` and reach the policy once that payload is surely evaluated (all but the
    newest): two choices late. A group of one makes the all-sums identities."""
    lockstep, seen = Lockstep(mx.distributed.init()), []

    class Policy:
        def choose(self, remaining, context):
            seen.append(("choose", remaining))
            return 2

        def accepted(self, k, n):
            seen.append(("accepted", k, n))

        def timed(self, k, seconds):
            seen.append(("timed", k, seconds))

    policy = LockstepDraftLength(lockstep, Policy())
    policy.choose(10, 0)
    mx.eval(lockstep.agree(mx.array([5])))
    policy.timed(2, 0.5)  # round 1 took 0.5 s: sent with round 2's decision
    policy.accepted(2, 1)  # counts are equal on every rank: told at once
    policy.choose(9, 3)
    decided = lockstep.agree(mx.array([6, 7], mx.uint32))
    assert decided.dtype == mx.uint32 and decided.tolist() == [6, 7]
    policy.timed(2, 0.25)
    policy.choose(8, 6)  # round 2's payload is the newest: it may still be computing
    mx.eval(lockstep.agree(mx.array([7])))
    policy.choose(7, 9)
    assert seen == [("choose", 10), ("accepted", 2, 1), ("choose", 9), ("choose", 8), ("timed", 2, 0.5),
                    ("choose", 7)]
    assert 0 <= lockstep.shared_seed() < 2**24


def test_a_group_of_one_changes_nothing():
    """`shard` over a single process (what `mlx.launch -n 1` gives): same tokens, through every lock-step path."""
    whole, drafter = make_pair("moe")
    sharded, _ = make_pair("moe")
    group = mx.distributed.init()
    shard(sharded, group)
    bundles = [Bundle(whole, drafter, None, {}, GenerationDefaults(), Path(".")),
               Bundle(sharded, drafter, None, {}, GenerationDefaults(), Path("."),
                      state=PairState(sharded, drafter, Lockstep(group)))]
    for k, sampler in ((0, None), (3, None), ("auto", None), (2, SamplerConfig(temperature=1.0, seed=3))):
        outputs = [[r.token for r in stream_generate(b, [2, 17, 301, 45], 12, sampler, k)] for b in bundles]
        assert outputs[0] == outputs[1], k
