"""Build the menu-bar app as a macOS bundle with py2app (no Dock icon: LSUIElement).

Run from the repository root, with the package and its `app` and `video` extras installed (not editable, so
that py2app's module finder sees plain folders; `video` is PyAV, which decodes attached video files):

    pip install '.[app,video]'
    python -m apps.menubar.setup_app py2app        # -> apps/menubar/dist/MLX Gemma MTP.app

`python -m` (or PYTHONPATH=.) puts the repository root on the path so py2app can find the `apps` package. The
build runs inside apps/menubar: setuptools would otherwise read the root pyproject.toml, whose dependencies
py2app >= 0.28.9 refuses ("install_requires is no longer supported").
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

from mlx_gemma_mtp import __version__

HERE = Path(__file__).resolve().parent

if importlib.util.find_spec("apps") is None or importlib.util.find_spec("apps.menubar") is None:
    sys.exit("run this from the repository root: python -m apps.menubar.setup_app py2app")

OPTIONS = {
    "argv_emulation": False,
    "plist": {
        "LSUIElement": True,  # a menu-bar item only: no Dock icon, no app menu
        "CFBundleName": "MLX Gemma MTP",
        "CFBundleIdentifier": "org.mlx-gemma-mtp.menubar",
        "CFBundleShortVersionString": __version__,
        "CFBundleVersion": __version__,
    },
    # copied whole: native libraries and kernels (mlx; av's FFmpeg), lazy imports the module finder misses
    # (transformers; av, imported only when a video file is decoded)
    "packages": ["apps", "mlx_gemma_mtp", "mlx", "mlx_lm", "transformers", "tokenizers", "huggingface_hub",
                 "jinja2", "sentencepiece", "rumps", "av"],
    "excludes": ["torch", "tensorflow", "jax", "tkinter", "hypothesis", "pytest"],
}

if __name__ == "__main__":
    os.chdir(HERE)
    setup(name="MLX Gemma MTP", version=__version__, app=[str(HERE / "__main__.py")],
          options={"py2app": OPTIONS})
