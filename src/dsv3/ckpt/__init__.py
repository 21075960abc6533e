from .io import CheckpointError
from .pretrained import load_pretrained, save_pretrained, model_bytes
