"""Parameter counts: the full-size preset against Qwen3-30B-A3B's published numbers (without building it),
and the count formula against a model actually built by megatron-core (the tiny preset)."""

import os
from pathlib import Path

import pytest
import torch.distributed as dist
from omegaconf import OmegaConf

from models.config import LMConfig, lm_param_count

REPO = Path(__file__).resolve().parents[2]


def preset(name: str) -> LMConfig:
    raw = OmegaConf.load(REPO / "recipes" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig), raw.lm))


def test_keye_30b_a3b_matches_published_qwen3_30b_a3b():
    pc = lm_param_count(preset("keye_30b_a3b"))
    # Qwen3-30B-A3B model card: "30.5B in total and 3.3B activated".
    assert round(pc.total / 1e9, 1) == 30.5, pc.total
    assert 3.3e9 <= pc.active < 3.4e9, pc.active


@pytest.fixture(scope="module")
def single_process_group():
    from parallel.groups import build_process_groups, init_distributed, seed_all
    from parallel.layout import ParallelConfig, ParallelLayout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    init_distributed()
    lm = preset("keye_tiny")
    layout = ParallelLayout.build(ParallelConfig(), world_size=1, lm=lm)
    pgs = build_process_groups(layout)
    seed_all(0, pgs)
    yield lm, layout, pgs
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["keye_tiny", "keye_tiny_ksa", "keye_tiny_dsa"])
def test_formula_matches_built_tiny_model(single_process_group, variant):
    from models.lm import build_lm, transformer_config

    _, layout, pgs = single_process_group
    raw = OmegaConf.load(REPO / "recipes" / "model" / f"{variant}.yaml")
    base = OmegaConf.load(REPO / "recipes" / "model" / "keye_tiny.yaml")
    lm = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig), base.lm, raw.lm))
    model = build_lm(lm, transformer_config(lm, layout.model_sizes(), bf16=False, use_cpu_initialization=True),
                     pg_collection=pgs, pp_rank=0, pp_size=1)
    built = sum(p.numel() for p in model.parameters())
    assert built == lm_param_count(lm).total
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert len(experts) == lm.num_layers * 2  # GroupedExperts: stacked w13 (gate+up) and w2 per layer
    assert all(not p.allreduce for n, p in model.named_parameters() if ".experts." in n)
