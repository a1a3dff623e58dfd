"""mlx-gemma-mtp: exact multi-token-prediction speculative decoding for Gemma 4 in MLX."""

from .batching import BatchGenerator, BatchResponse, batch_generate
from .decode import GenerationResponse, generate, stream_generate
from .load import Bundle, load
from .prompt_cache import PromptCache
from .sampling import SamplerConfig
from .stats import DraftStats

__all__ = ["BatchGenerator", "BatchResponse", "Bundle", "DraftStats", "GenerationResponse", "PromptCache",
           "SamplerConfig", "batch_generate", "generate", "load", "stream_generate"]
__version__ = "0.1.0"
