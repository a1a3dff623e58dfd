"""HF Gemma 4 checkpoints -> MLX bundles (installed as `mlx_gemma_mtp.convert`)."""
