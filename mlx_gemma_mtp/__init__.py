"""mlx-gemma-mtp: exact multi-token-prediction speculative decoding for Gemma 4 in MLX."""

from .decode import GenerationResponse, generate, stream_generate
from .load import Bundle, load
from .prompt_cache import PromptCache
from .sampling import SamplerConfig
from .stats import DraftStats

__all__ = ["Bundle", "DraftStats", "GenerationResponse", "PromptCache", "SamplerConfig", "generate", "load",
           "stream_generate"]
__version__ = "0.1.0"
