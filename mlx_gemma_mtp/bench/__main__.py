"""`python -m mlx_gemma_mtp.bench`: the decoding benchmark (see `decoding`)."""

from .decoding import main

main()
