"""The vision tower: native-resolution SigLIP ViT + 2x2 patch merger (see README.md)."""

from models.vision.config import VisionConfig, so400m, tiny
from models.vision.model import VisionModel, frame_flops

__all__ = ["VisionConfig", "VisionModel", "frame_flops", "so400m", "tiny"]
