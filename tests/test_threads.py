"""The threading contract: a bundle loaded on one thread generates on another; one generation at a time per
bundle (other threads wait their turn, the same thread gets a clear error); threads exit cleanly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

import mlx_gemma_mtp


def run_in_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test thread
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_loaded_on_one_thread_generates_on_another(pair_dir):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    prompt = [2, 10, 11, 12]
    here = mlx_gemma_mtp.generate(bundle, "The quick brown fox", max_tokens=8, num_draft_tokens=3)
    fresh = mlx_gemma_mtp.load(pair_dir("e2b")[0])  # first used on the other thread
    there = run_in_thread(lambda: mlx_gemma_mtp.generate(fresh, "The quick brown fox", max_tokens=8,
                                                          num_draft_tokens=3))
    assert there == here
    tokens = run_in_thread(lambda: [r.token for r in mlx_gemma_mtp.stream_generate(fresh, prompt, max_tokens=6)])
    assert tokens == [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=6)]


def test_second_generation_on_the_same_thread_is_refused_until_the_first_ends(pair_dir):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    first = mlx_gemma_mtp.stream_generate(bundle, [2, 10, 11], max_tokens=20, num_draft_tokens=2)
    next(first)
    with pytest.raises(RuntimeError, match="already generating on this thread"):
        next(mlx_gemma_mtp.stream_generate(bundle, [2, 10, 11], max_tokens=2))
    first.close()
    assert len(list(mlx_gemma_mtp.stream_generate(bundle, [2, 10, 11], max_tokens=3, num_draft_tokens=0))) == 3


def test_two_threads_on_one_bundle_take_turns_and_match(pair_dir):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    prompts = [[2, 10, 11, 12], [2, 20, 21]]
    expected = [[r.token for r in mlx_gemma_mtp.stream_generate(bundle, p, max_tokens=12, num_draft_tokens=0)]
                for p in prompts]
    results = [None, None]

    def worker(i):
        results[i] = [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompts[i], max_tokens=12)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


THREADED_EXIT = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, "tests")
    import mlx_gemma_mtp
    bundle = mlx_gemma_mtp.load(sys.argv[1])
    def work():
        for _ in range(2):
            mlx_gemma_mtp.generate(bundle, [2, 10, 11, 12], max_tokens=10)  # auto: the compiled drafter
    threads = [threading.Thread(target=work) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print("ok")
""")


def test_process_exits_cleanly_after_threaded_mtp(pair_dir):
    """MLX aborts the process at exit (SIGABRT) when threads that created streams end without releasing them;
    a generating thread's streams are released as it ends."""
    proc = subprocess.run([sys.executable, "-c", THREADED_EXIT, str(pair_dir("e2b")[0])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
