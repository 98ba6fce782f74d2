"""Pretraining entry point (Hydra). Examples:

    torchrun --nproc_per_node 2 launch/pretrain.py recipe=keye_tiny              # CPU, gloo
    torchrun --nproc_per_node 8 launch/pretrain.py recipe=keye_30b_a3b           # one GPU node
    torchrun ... launch/pretrain.py recipe=keye_tiny train.lr=1e-3 parallel.ep=1 run_dir=runs/other

Config errors (unknown key, wrong type, impossible layout) stop here, before any process group exists.
Rerunning a command whose run directory holds a checkpoint resumes it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from train.config import register_configs  # noqa: E402

register_configs()


@hydra.main(config_path="../recipes", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    from train.launch import run

    run(dcfg)


if __name__ == "__main__":
    main()
