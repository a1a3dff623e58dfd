"""The menu-bar app's settings: a small JSON file in the user's application-support folder.

macOS: ~/Library/Application Support/mlx-gemma-mtp/settings.json; elsewhere $XDG_CONFIG_HOME/mlx-gemma-mtp
(or ~/.config/mlx-gemma-mtp). Reading never fails: a missing file gives the defaults, a corrupt or invalid one
the defaults for what could not be used plus a notice for the user. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

APP_NAME = "mlx-gemma-mtp"
SPECULATIVE_MODES = ("auto", "on", "off")
MAX_DRAFT_TOKENS = 16  # the longest draft stream_generate accepts


def settings_dir() -> Path:
    """The per-user folder for this app's settings (and, by default, its converted models)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP_NAME
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / APP_NAME


def default_path() -> Path:
    return settings_dir() / "settings.json"


@dataclass
class Settings:
    models_folder: str = ""  # "" = settings_dir()/models, resolved in __post_init__
    last_model: str | None = None
    speculative_mode: str = "auto"  # "auto" | "on" (draft num_draft_tokens) | "off"
    num_draft_tokens: int = 3
    max_tokens: int = 512
    temperature: float = 0.0
    server_port: int = 8080  # Server ▸ Start serves the model on 127.0.0.1 at this port

    def __post_init__(self):
        self.models_folder = self.models_folder or str(settings_dir() / "models")

    @property
    def draft_request(self) -> int | str:
        """`num_draft_tokens` for stream_generate: "auto", K, or 0 (plain decoding)."""
        return {"auto": "auto", "on": self.num_draft_tokens, "off": 0}[self.speculative_mode]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_VALID = {
    "models_folder": lambda x: isinstance(x, str) and x.strip() != "",
    "last_model": lambda x: x is None or (isinstance(x, str) and x.strip() != ""),
    "speculative_mode": lambda x: x in SPECULATIVE_MODES,
    "num_draft_tokens": lambda x: _is_int(x) and 1 <= x <= MAX_DRAFT_TOKENS,
    "max_tokens": lambda x: _is_int(x) and 1 <= x <= 1_000_000,
    "temperature": lambda x: (_is_int(x) or isinstance(x, float)) and math.isfinite(x) and 0 <= x <= 10,
    "server_port": lambda x: _is_int(x) and 1 <= x <= 65535,
}


def load_settings(path: Path | None = None) -> tuple[Settings, str | None]:
    """(settings, notice): notice is None when the file was fine or absent, else a sentence for the user."""
    path = Path(path) if path is not None else default_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings(), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return Settings(), f"Settings file {path} could not be read ({e}); using the defaults."
    if not isinstance(data, dict):
        return Settings(), f"Settings file {path} does not hold a JSON object; using the defaults."
    names = [f.name for f in fields(Settings)]
    good = {k: data[k] for k in names if k in data and _VALID[k](data[k])}
    bad = [k for k in names if k in data and k not in good]
    settings = Settings(**good)
    if bad:
        return settings, f"Settings file {path}: invalid {', '.join(bad)}; using the default for those."
    return settings, None


def save_settings(settings: Settings, path: Path | None = None) -> None:
    """Write atomically: a crash mid-write leaves the old file, never a truncated one."""
    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".settings-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(settings), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
