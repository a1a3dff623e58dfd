"""`python -m mlx_gemma_mtp.convert --hf-path ... --mlx-path ...` (options of `mlx-gemma-mtp convert`)."""

import sys

from .convert import main

sys.exit(main())
