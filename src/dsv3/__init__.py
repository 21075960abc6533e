"""dsv3: DeepSeek-V3 in readable, fast PyTorch."""

from .ckpt import CheckpointError, load_pretrained, save_pretrained
from .config import ModelConfig
from .infer import LLM, RequestOutput, SamplingParams
from .model import DeepSeekV3, init_weights

__version__ = "0.1.0"
__all__ = ["ModelConfig", "DeepSeekV3", "init_weights", "load_pretrained", "save_pretrained", "CheckpointError",
           "LLM", "SamplingParams", "RequestOutput"]
