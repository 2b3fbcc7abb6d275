"""DeepSeek-V4 in JAX / Flax NNX: config presets, the model, and conversion to and from the official layout.

The model is imported on first use, so light users of the package (the data pipeline's worker processes, the
data preparation tool) do not pay for importing JAX and Flax.
"""

from deepseek_v4.config import Config, get_config

__all__ = ["Config", "get_config", "DeepseekV4", "TrainOutputs"]


def __getattr__(name):
    if name in ("DeepseekV4", "TrainOutputs"):
        from deepseek_v4 import model

        return getattr(model, name)
    raise AttributeError(f"module 'deepseek_v4' has no attribute {name!r}")
