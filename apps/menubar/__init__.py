"""A macOS menu-bar app for mlx_gemma_mtp: `python -m apps.menubar` (needs the `app` extra: rumps).

`worker`, `settings` and `models` import without rumps, so they run and are tested on any platform; only `app`
needs rumps (and so macOS).
"""
