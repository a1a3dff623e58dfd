"""Converted model bundles in the models folder, their size on disk and a "fits in memory" hint.

A bundle is a subfolder holding `config.json` (drafter in `drafter/`, as the converter writes it). The hint
compares the bundle's size (plus room for the KV cache and activations) with the machine's memory; on Apple
silicon MLX by default wires at most about three quarters of it for the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

GPU_SHARE = 0.75  # of physical memory the GPU may wire by default (macOS recommendedMaxWorkingSetSize)
OVERHEAD = 1.15  # weights + KV cache + activations, for the short contexts of a chat


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    size_bytes: int
    has_drafter: bool


def folder_size(path: Path) -> int:
    """Bytes of all files under `path` (symlinks followed to their targets, as a hub cache stores them)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # a dangling link counts as nothing
                continue
    return total


def _is_target(folder: Path) -> bool:
    """True for a folder with a config.json that is not a bare drafter (those load only beside a target)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") != "gemma4_assistant"
    except (OSError, ValueError, AttributeError):
        return True  # listed anyway, so that picking it shows the user what is wrong


def find_models(folder: str | Path) -> list[ModelEntry]:
    """Bundles directly inside `folder`, sorted by name; [] when the folder does not exist."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    subdirs = sorted(filter(_is_target, folder.iterdir()), key=lambda p: p.name.lower())
    return [ModelEntry(p.name, p, folder_size(p), (p / "drafter" / "config.json").is_file()) for p in subdirs]


def total_memory() -> int | None:
    """Physical memory in bytes, or None when the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        try:
            return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                      check=True).stdout)
        except (OSError, ValueError, subprocess.CalledProcessError):
            return None
    return None


def memory_hint(size_bytes: int, memory_bytes: int | None) -> str:
    """"fits", "tight" (may swap or need a higher wired limit), "too big", or "?" when memory is unknown."""
    if not memory_bytes:
        return "?"
    need = size_bytes * OVERHEAD
    if need <= GPU_SHARE * memory_bytes:
        return "fits"
    return "tight" if need <= memory_bytes else "too big"


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def describe(entry: ModelEntry, memory_bytes: int | None) -> str:
    """Menu label, e.g. "gemma-4-e2b-it-4bit · 3.1 GB · MTP · fits"."""
    parts = [entry.name, format_bytes(entry.size_bytes)]
    if entry.has_drafter:
        parts.append("MTP")
    parts.append(memory_hint(entry.size_bytes, memory_bytes))
    return " · ".join(parts)
