"""Applications built on mlx_gemma_mtp's public API (not part of the installed library)."""
