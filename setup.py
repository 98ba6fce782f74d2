"""Keye-VL training framework: megatron-core MoE LM + SigLIP ViT, DSA/KSA attention, video data."""
from setuptools import find_packages, setup

# Versions are the ones the code is tested with (see ../shared/KNOWN-TRAPS.md in the design notes):
# megatron-core 0.17+ needs Python >= 3.12, 0.16.1 runs on 3.11 (CI) and 3.12 (GPU machine).
# torch is left as a range: the CPU build 2.13.0 is installed first on CPU machines, and a
# range that it satisfies keeps pip from pulling a CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.15",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "triton==3.6.0",
    "webdataset==1.0.2",
    "decord==0.6.0",
    # 18.1.0 and 18.1.1 tested; 17 writes no rotated clip (no Stream.set_display_rotation): the suite's rotated
    # videos need 18.
    # Reproducible files need asm=0 and one encoder thread (data/video/synthetic.py)
    "av>=18,<19",
    "hydra-core==1.3.8",
    "omegaconf>=2.3,<2.4",
    "wandb>=0.19",
    "torchdata==0.11.0",
    "numpy<3",  # 2.4 tested
    "einops",
    "tqdm",
    "safetensors",
    "tokenizers>=0.21,<1",  # data.video.tokenizer=<a Hugging Face tokenizer directory>; 0.23 tested
    "pillow>=10,<14",  # image samples (data/video/images.py); 13.0 tested
]
# train.tensorboard's writer (train/tensorboard.py): one 88 kB wheel over numpy and protobuf, installed in 2 s (2.6.5
# tested, with protobuf 7); torch.utils.tensorboard needs the tensorboard package, about 20 MB of new wheels (grpcio,
# its data server)
TENSORBOARD_REQUIRES = ["tensorboardX>=2.6,<3"]
# transformers: the reference implementation HF-interop tests compare logits against; pytest-xdist >= 3.8 for
# --no-loadscope-reorder (pytest.ini)
DEV_REQUIRES = ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.8", "transformers==5.24.0", *TENSORBOARD_REQUIRES]

setup(
    name="keye-train",
    version="0.1.0",
    description="Distributed training of long-video MoE vision-language models (Keye-VL-2.0 class)",
    python_requires=">=3.11",
    packages=find_packages(include=["kernels*", "models*", "parallel*", "data*", "train*", "launch*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES, "tensorboard": TENSORBOARD_REQUIRES},
)
