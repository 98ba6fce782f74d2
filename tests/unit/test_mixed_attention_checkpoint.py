"""A model whose layers mix attention variants (model.lm.attention_per_layer) is checkpointed and loaded back.

Megatron stacks a per-layer tensor along one layer axis that every index must fill. A variant's own parameters
(DSA's indexer, KSA's summary QKV) exist on its layers only, so they are stacked over those layers alone
(models/attention variant_place). Before that, saving such a model failed ("Invalid access pattern"), after the
run's first steps. The reference: the model's own parameters, written and read through megatron's
dist_checkpointing into a model of other initial weights, compared exactly."""

import pytest
import torch

from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron


@pytest.fixture(scope="module")
def pgs():
    yield init_one_process_megatron(0)
    destroy_one_process_megatron()


def _build(kinds, pgs, seed):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from models.config import DSAConfig, KSAConfig, LMConfig, ModelParallelSizes
    from models.lm import build_lm, transformer_config

    lm = LMConfig(num_layers=len(kinds), attention_per_layer=kinds, loss_chunk_tokens=0,
                  dsa=DSAConfig(index_heads=2, index_dim=4, topk=8), ksa=KSAConfig(chunk=4, windows=[2]))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return build_lm(lm, transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True),
                    pg_collection=pgs, pp_rank=0, pp_size=1)


@pytest.mark.parametrize("kinds, key, count", [
    (["dense", "dsa", "dense", "dsa"], "decoder.layers.self_attention.indexer.wq.weight", 2),
    (["dsa", "dense", "dense"], "decoder.layers.self_attention.indexer.k_norm.weight", 1),
    (["ksa", "dense", "ksa", "ksa"], "decoder.layers.self_attention.linear_qkv_summary.weight", 3),
    (["dsa", "dsa"], "decoder.layers.self_attention.indexer.ww.weight", 2),   # every layer: megatron's own axis
])
def test_a_model_of_mixed_attention_saves_and_loads(pgs, tmp_path, kinds, key, count):
    from megatron.core import dist_checkpointing

    a, b = _build(kinds, pgs, seed=1), _build(kinds, pgs, seed=2)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    dist_checkpointing.save(a.sharded_state_dict(), str(tmp_path))
    assert dist_checkpointing.load_tensors_metadata(str(tmp_path))[key].global_shape[0] == count
    b.load_state_dict(dist_checkpointing.load(b.sharded_state_dict(), str(tmp_path)))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
