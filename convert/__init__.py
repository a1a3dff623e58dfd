"""HF Gemma 4 checkpoints (+ MTP drafter) -> MLX bundles (installed as `mlx_gemma_mtp.convert`).

`convert(hf_path, mlx_path, ...)` writes one bundle folder that `mlx_gemma_mtp.load` reads; `quality_report`
measures what quantization cost against the float32 source. CLI: `mlx-gemma-mtp convert` / `eval-quant`, or
`python -m mlx_gemma_mtp.convert`.
"""

from .convert import add_convert_parser, convert
from .report import add_eval_quant_parser, format_report, quality_report

__all__ = ["add_convert_parser", "add_eval_quant_parser", "convert", "format_report", "quality_report"]
