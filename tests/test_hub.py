"""Hub checkpoints as huggingface_hub stores them: a snapshot folder of relative symlinks into `../../blobs/`.

Every released Gemma 4 target is sharded, so the loader and the converter must read shards that are symlinks
(while still refusing an index that *names* a file outside the folder). The hub cache is faked on disk and
huggingface_hub runs offline, so `load("owner/name")` goes through the real `snapshot_download` path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import pytest
from conftest import write_pair
from mlx.utils import tree_flatten
from mlx_gemma_mtp.convert import convert

import mlx_gemma_mtp

REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(src: Path, cache: Path, repo_id: str) -> Path:
    """Lay `src` out as the hub cache does: content-addressed blobs, a snapshot of relative symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A private, offline hub cache: returns `add(src, repo_id) -> snapshot folder`."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return lambda src, repo_id: fake_hub_cache(src, cache, repo_id)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A sharded HF target (as every released one is) with its drafter in drafter/ and a tokenizer."""
    path = tmp_path_factory.mktemp("sharded")
    write_pair(path, "e2b", max_shard_size="50KB")
    return path


def same_weights(a, b) -> bool:
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return pa.keys() == pb.keys() and all(mx.array_equal(pa[k], pb[k]).item() for k in pa)


def test_snapshot_is_made_of_relative_symlinks(sharded, offline_hub):
    snapshot = offline_hub(sharded, "google/gemma-4-tiny-it")
    shards = sorted(snapshot.glob("model-*.safetensors"))
    assert len(shards) > 1, "the faked target must be sharded"
    assert all(s.is_symlink() and not os.readlink(s).startswith("/") for s in shards)
    assert all(s.resolve().parent.name == "blobs" for s in shards)


def test_sharded_hub_snapshot_loads_by_id_and_by_folder(sharded, offline_hub):
    src = sharded
    snapshot = offline_hub(src, "google/gemma-4-tiny-it")
    offline_hub(src / "drafter", "google/gemma-4-tiny-it-assistant")
    direct = mlx_gemma_mtp.load(src)
    by_id = mlx_gemma_mtp.load("google/gemma-4-tiny-it", draft="google/gemma-4-tiny-it-assistant")
    by_folder = mlx_gemma_mtp.load(snapshot)
    assert by_id.path == snapshot
    for bundle in (by_id, by_folder):
        assert same_weights(bundle.target, direct.target) and same_weights(bundle.drafter, direct.drafter)
        assert bundle.tokenizer is not None
    ids = [2, 10, 11, 12, 13]
    plain = [r.token for r in mlx_gemma_mtp.stream_generate(direct, ids, max_tokens=6, num_draft_tokens=0)]
    mtp = [r.token for r in mlx_gemma_mtp.stream_generate(by_id, ids, max_tokens=6, num_draft_tokens=3)]
    assert mtp == plain


def test_folder_of_absolute_symlinks_loads(sharded, tmp_path):
    """The issue's repro: `mkdir x && ln -s $PWD/checkpoint/* x/`."""
    src = sharded
    linked = tmp_path / "x"
    linked.mkdir()
    for file in src.iterdir():
        (linked / file.name).symlink_to(file.resolve())
    bundle = mlx_gemma_mtp.load(linked)
    assert same_weights(bundle.target, mlx_gemma_mtp.load(src).target)
    assert bundle.drafter is not None


def test_sharded_hub_snapshot_converts_by_id(sharded, offline_hub, tmp_path):
    src = sharded
    offline_hub(src, "google/gemma-4-tiny-it")
    out = convert("google/gemma-4-tiny-it", tmp_path / "out", dtype="float32")
    assert not any(p.is_symlink() for p in out.rglob("*")), "the bundle holds copies, not links into the cache"
    bundle = mlx_gemma_mtp.load(out)
    assert same_weights(bundle.target, mlx_gemma_mtp.load(src, dtype=mx.float32).target)
    assert bundle.drafter is not None and bundle.tokenizer is not None


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", ".."])
def test_index_naming_a_path_is_refused_even_in_a_snapshot(sharded, offline_hub, tmp_path, bad):
    src = sharded
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in src.iterdir():
        if file.is_file():
            (copy / file.name).write_bytes(file.read_bytes())
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    snapshot = offline_hub(copy, "google/evil")
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        mlx_gemma_mtp.load(snapshot)
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        convert("google/evil", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("role", ["model", "drafter"])
def test_offline_hub_miss_names_the_id_and_the_fix(sharded, offline_hub, role):
    src = sharded
    offline_hub(src, "google/gemma-4-tiny-it")
    model, draft = ("google/missing", None) if role == "model" else ("google/gemma-4-tiny-it", "google/missing")
    with pytest.raises(FileNotFoundError, match=rf"{role} 'google/missing' is not in the local hub cache") as e:
        mlx_gemma_mtp.load(model, draft=draft)
    assert "hf download google/missing" in str(e.value) and "local folder" in str(e.value)
