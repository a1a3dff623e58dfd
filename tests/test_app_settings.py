"""The menu-bar app's settings: round trip, safe reading of missing/corrupt/invalid files, atomic writes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from apps.menubar import settings as settings_module
from apps.menubar.settings import Settings, load_settings, save_settings


def test_round_trip(tmp_path):
    path = tmp_path / "nested" / "settings.json"
    saved = Settings(models_folder=str(tmp_path / "models"), last_model=str(tmp_path / "models" / "m"),
                     speculative_mode="on", num_draft_tokens=5, max_tokens=64, temperature=0.7)
    save_settings(saved, path)
    assert load_settings(path) == (saved, None)
    assert json.loads(path.read_text())["num_draft_tokens"] == 5
    assert os.listdir(path.parent) == ["settings.json"]  # the temp file was renamed, not left behind
    modes = [Settings(speculative_mode=m) for m in ("auto", "on", "off")]
    assert [s.draft_request for s in modes] == ["auto", 3, 0]


def test_missing_file_gives_defaults_without_notice(tmp_path):
    assert load_settings(tmp_path / "absent.json") == (Settings(), None)


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", "null", b"\xff\xfe\x00"])
def test_corrupt_file_gives_defaults_and_a_notice(tmp_path, content):
    path = tmp_path / "settings.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    settings, notice = load_settings(path)
    assert settings == Settings() and notice and str(path) in notice and "defaults" in notice


def test_invalid_fields_fall_back_one_by_one(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"models_folder": "/m", "speculative_mode": "sometimes", "num_draft_tokens": 0,
                                "max_tokens": True, "temperature": -1, "last_model": "/m/x", "unknown": 1}))
    settings, notice = load_settings(path)
    assert settings == Settings(models_folder="/m", last_model="/m/x")
    for name in ("speculative_mode", "num_draft_tokens", "max_tokens", "temperature"):
        assert name in notice
    assert "models_folder" not in notice and "unknown" not in notice


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "settings.json"
    save_settings(Settings(max_tokens=7), path)

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(settings_module.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        save_settings(Settings(max_tokens=8), path)
    monkeypatch.undo()
    assert load_settings(path)[0].max_tokens == 7 and os.listdir(tmp_path) == ["settings.json"]


def test_default_location(monkeypatch, tmp_path):
    if sys.platform == "darwin":
        expected = Path.home() / "Library" / "Application Support" / "mlx-gemma-mtp" / "settings.json"
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        expected = tmp_path / "mlx-gemma-mtp" / "settings.json"
    assert settings_module.default_path() == expected
    assert Settings().models_folder == str(expected.parent / "models")
    monkeypatch.setattr(settings_module.sys, "platform", "darwin")
    assert settings_module.settings_dir() == Path.home() / "Library" / "Application Support" / "mlx-gemma-mtp"
