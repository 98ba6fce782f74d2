"""CPU mode's all_gather of uneven outputs (parallel/cpu_mode.py), in one process.

megatron's alltoall dispatcher gathers each expert-TP rank's tokens into outputs of different sizes when
parallel.ep > 1 and parallel.etp > 1, which gloo refuses ("ProcessGroupGloo::allgather: invalid tensor size").
Here a stand-in for gloo's all_gather of a 3-rank world keeps gloo's rule (every output the input's size) and
delivers each rank's tensor as sent; the wrapped call must give every rank the plain concatenation of the ranks'
tensors, exactly (copies only). The gather through the real dispatcher on 4 gloo ranks is the EP2 x TP2 x ETP2
entry of tests/dist/test_cp_model.py.
"""

import pytest
import torch

from parallel.cpu_mode import _all_gather_uneven


def _gloo_like(world: list[torch.Tensor], calls: list):
    """all_gather of a world whose rank i sends what the caller sends when it is rank i (the caller's tensor has
    the padded size the wrapper chose, so rank i's tensor is padded alike), under gloo's size rule."""
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        calls.append([tuple(t.shape) for t in tensor_list])
        if any(t.shape != tensor.shape for t in tensor_list):
            raise RuntimeError("ProcessGroupGloo::allgather: invalid tensor size")
        for out, sent in zip(tensor_list, world):
            out.zero_()
            out[:sent.shape[0]] = sent
    return all_gather


@pytest.mark.parametrize("rows", [[3, 5, 0], [4, 4, 4]], ids=["uneven_with_empty", "even"])
def test_uneven_outputs_get_each_ranks_rows(rows):
    g = torch.Generator().manual_seed(42)
    world = [torch.randn(n, 6, generator=g) for n in rows]
    for rank in range(len(world)):
        calls = []
        gather = _all_gather_uneven(_gloo_like(world, calls))
        out = torch.full((sum(rows), 6), float("nan"))  # an unwritten row stays NaN
        gather(list(torch.split(out, rows)), world[rank])
        assert torch.equal(out, torch.cat(world)), rank
        assert calls == [[(max(rows), 6)] * len(rows)]   # one gloo call, all outputs padded to the largest


def test_plain_gloo_rule_refuses_uneven_outputs():
    world = [torch.ones(2, 3), torch.ones(5, 3)]
    out = torch.empty(7, 3)
    with pytest.raises(RuntimeError, match="invalid tensor size"):
        _gloo_like(world, [])(list(torch.split(out, [2, 5])), world[0])
