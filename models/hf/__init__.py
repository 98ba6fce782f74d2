"""Hugging Face interop: Qwen3-MoE checkpoints <-> this project's language model, and the vision tower +
projector of Keye-VL multimodal checkpoints <-> models.vision.VisionModel (see docs/hf.md)."""

from models.hf.checkpoint_io import HFCheckpoint, HFShardWriter, is_hf_checkpoint
from models.hf.keye_vision import (
    KeyeLMView,
    add_vision_to_hf_dir,
    check_vision_config,
    export_keye_vision,
    export_keye_vl,
    is_multimodal,
    lm_checkpoint,
    lm_hf_config,
    load_keye_vision_into,
    projector_width,
    save_tiny_keye_vl,
    vision_config_from_hf,
)
from models.hf.qwen3_moe import (
    check_hf_config,
    check_hf_tensors,
    export_hf,
    hf_config_from_lm,
    hf_tensor_shapes,
    lm_config_from_hf,
    load_hf_into,
    megatron_to_hf,
)

__all__ = ["HFCheckpoint", "HFShardWriter", "KeyeLMView", "add_vision_to_hf_dir", "check_hf_config", "check_hf_tensors",
           "check_vision_config", "export_hf", "export_keye_vision", "export_keye_vl", "hf_config_from_lm",
           "hf_tensor_shapes", "is_hf_checkpoint", "is_multimodal", "lm_checkpoint", "lm_config_from_hf", "lm_hf_config", "load_hf_into",
           "load_keye_vision_into", "megatron_to_hf", "projector_width", "save_tiny_keye_vl",
           "vision_config_from_hf"]
