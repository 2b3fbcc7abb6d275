"""DeepSeek-V4 in JAX / Flax NNX: config presets, the model, and conversion to and from the official layout."""

from deepseek_v4.config import Config, get_config
from deepseek_v4.model import DeepseekV4, TrainOutputs

__all__ = ["Config", "get_config", "DeepseekV4", "TrainOutputs"]
