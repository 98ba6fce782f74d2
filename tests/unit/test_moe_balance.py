"""The balancing loss at each level of model.lm.moe_balance (models/moe/router.py) against plain PyTorch.

One process, gloo world of 1, one router of the tiny MoE LM (fp32, CPU, 8 experts top-2) fed three micro-batches of
[S, B] tokens, each drawn around its own centre (a "domain": each routes mostly to its own experts, so micro-batch,
global-batch and per-row counts differ). The reference takes the router's logits, p = softmax, the unbiased top-k
counts c (not differentiated), and per micro-batch m

    micro_batch   L = E sum_e f_e P_e,  f = c_m / (k S B),  P = mean_t p over the micro-batch
    global_batch  f = (c_1 + ... + c_m) / their sum (the step's counts so far), P as above
    sequence      the mean over rows b of E sum_e f_be P_be, f_b = c_mb / (k S), P_b = mean over the row

and on a packed row of S B tokens (four documents and padding, as the trainer gives them) `sequence` per document,

    L = sum_d (T_d / T) E sum_e f_de P_de,  f_de = c_de / (k T_d),  P_de = mean over d's T_d tokens,  T = sum_d T_d,

and the gradient of coeff x (S B) x L into the logits (the weight a micro-batch's loss gets outside the trainer's
step: its routed tokens; parallel/megatron_compat.py fix 2). Tolerances: loss 1e-6 relative and gradient 1e-5
relative RMSE: the same fp32 formula with sums in another order (measured <= 4e-7 for both).
"""

import warnings

import pytest
import torch

from tests.kernels.helpers import assert_close, rel_rmse
from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron

SEED = 5
S, B, MICRO, E, K, H = 12, 3, 3, 8, 2, 16
COEFF = 0.01


@pytest.fixture(scope="module")
def pgs():
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    pgs = init_one_process_megatron(SEED)
    get_moe_layer_wise_logging_tracker().clear()
    try:
        yield pgs
    finally:
        get_moe_layer_wise_logging_tracker().clear()
        destroy_one_process_megatron()


def _lm(**kw):
    from models.config import LMConfig

    return LMConfig(**{"num_layers": 1, "hidden_size": H, "num_experts": E, "moe_topk": K, "loss_chunk_tokens": 0,
                       "moe_aux_loss_coeff": COEFF, **kw})


def _router(pgs, balance: str, expert_bias: bool = False):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from models.config import ModelParallelSizes
    from models.lm import transformer_config
    from models.moe.router import BalancedTopKRouter, BiasedTopKRouter

    cfg = transformer_config(_lm(), ModelParallelSizes(), bf16=False, use_cpu_initialization=True)
    cls = BiasedTopKRouter if expert_bias else BalancedTopKRouter
    torch.manual_seed(SEED)
    router = cls(cfg, pg_collection=pgs, balance=balance).train()
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
    router.set_layer_number(1)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))   # the loss reaches the logits unscaled
    return router


def _micro_batches():
    g = torch.Generator().manual_seed(SEED)
    centres = 2.0 * torch.randn(MICRO, H, generator=g)
    return [centres[m] + torch.randn(S, B, H, generator=g) for m in range(MICRO)]


def _run(router):
    """Per micro-batch: (logged loss, logits [S, B, E], d(coeff x S B x loss)/d logits)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    gating, kept = router.gating, []

    def keep(x):
        logits = gating(x)
        logits.retain_grad()
        kept.append(logits)
        return logits

    router.gating = keep
    out = []
    try:
        for x in _micro_batches():
            tracker.clear()
            probs, _ = router(x)
            (probs.sum() * 0).backward()   # only the balancing loss's gradient reaches the logits
            logged = float(tracker["load_balancing_loss"]["values"][0].detach())
            out.append((logged, kept[-1].detach().view(S, B, E), kept[-1].grad.view(S, B, E)))
    finally:
        del router.gating
        tracker.clear()
    return out


def _reference(balance: str, logits_all):
    """Per micro-batch: (loss, gradient into the logits), written out from the formulas above."""
    out, running = [], torch.zeros(E, dtype=torch.float64)
    for logits in logits_all:
        logits = logits.clone().requires_grad_(True)
        p = logits.float().softmax(dim=-1)                                           # [S, B, E]
        c = torch.zeros_like(p).scatter(-1, p.detach().topk(K, dim=-1).indices, 1.0)  # [S, B, E] counts
        if balance == "sequence":
            loss = (E * (c.sum(0) / (K * S) * p.mean(0)).sum(-1)).mean()
        else:
            f = c.sum((0, 1)) / (K * S * B)
            if balance == "global_batch":
                running += c.sum((0, 1)).double()
                f = (running / running.sum()).float()
            loss = E * (f * p.mean((0, 1))).sum()
        (grad,) = torch.autograd.grad(COEFF * S * B * loss, logits)
        out.append((float(loss), grad))
    return out


@pytest.mark.parametrize("balance", ["micro_batch", "global_batch", "sequence"])
def test_loss_and_gradient_match_the_plain_reference(pgs, balance):
    got = _run(_router(pgs, balance))
    ref = _reference(balance, [g[1] for g in got])
    for m, ((loss, _, grad), (ref_loss, ref_grad)) in enumerate(zip(got, ref)):
        assert loss == pytest.approx(ref_loss, rel=1e-6), (balance, m)
        assert_close(f"{balance} micro-batch {m} dL/dlogits", ref_grad, grad, 1e-5)
    # the levels differ on these micro-batches: a level computed as another could not pass
    micro = _reference("micro_batch", [g[1] for g in got])
    if balance != "micro_batch":
        assert max(rel_rmse(a[1], b[1]) for a, b in zip(micro, ref)) > 0.1


def test_global_counts_restart_each_step(pgs):
    """The step's counts start at zero after RouterStats closes a step, so a second step repeats the first."""
    from train.moe_stats import RouterStats

    router = _router(pgs, "global_batch")
    stats = RouterStats([router], num_layers=1, num_experts=E, dp_size=1, device=torch.device("cpu"))
    try:
        first = _run(router)
        assert float(router.step_counts.sum()) == MICRO * S * B * K
        stats.step_vector()
        assert float(router.step_counts.sum()) == 0
        second = _run(router)
    finally:
        stats.remove()
    for a, b in zip(first, second):
        assert a[0] == b[0] and torch.equal(a[2], b[2])


def test_biased_router_balances_at_the_chosen_level(pgs):
    """With the expert bias the balancing loss still counts the unbiased top-k, at the chosen level."""
    router = _router(pgs, "global_batch", expert_bias=True)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))   # moves the choice, not the balancing loss
    got = _run(router)
    ref = _reference("global_batch", [g[1] for g in got])
    for (loss, _, grad), (ref_loss, ref_grad) in zip(got, ref):
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert_close("biased global_batch dL/dlogits", ref_grad, grad, 1e-5)


def test_the_model_builds_the_chosen_router(pgs):
    """Every level builds ours (the default, micro_batch, too: megatron's loss, with a packed row's padding left
    out)."""
    from megatron.core.transformer.moe.router import TopKRouter

    from models.config import ModelParallelSizes
    from models.lm import build_lm, transformer_config
    from models.moe.router import BalancedTopKRouter

    for balance in ("micro_batch", "global_batch", "sequence"):
        lm = _lm(moe_balance=balance)
        cfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True)
        model = build_lm(lm, cfg, pg_collection=pgs, pp_rank=0, pp_size=1)
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        assert [type(r) for r in routers] == [BalancedTopKRouter], balance
        assert getattr(routers[0], "balance", "micro_batch") == balance


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model\.lm\.moe_balance must be one of .*'global'"):
        _lm(moe_balance="global")
    with pytest.warns(UserWarning, match=r"model\.lm\.moe_balance=sequence is ignored"):
        _lm(moe_balance="sequence", moe_aux_loss_coeff=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _lm(moe_balance="micro_batch", moe_aux_loss_coeff=0.0)


class _Group:
    """A stand-in process group of `size` ranks that all routed this rank's micro-batches (an all-reduce multiplies
    by the size)."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def test_global_batch_takes_one_all_reduce_per_micro_batch(pgs, monkeypatch):
    """At TP2 x DP2 (stand-in groups whose ranks all hold this rank's tokens) the global counts take one all-reduce of
    E counts over TP x DP x CP per micro-batch, and the loss is this rank's share of the reference: f as in one
    process (every rank the same counts), P over its replica's 2 x S x B tokens of which it holds half."""
    router = _router(pgs, "global_batch")
    tp_cp, tp_dp_cp = _Group(2), _Group(4)
    router.tp_cp_group, router.tp_dp_cp_group = tp_cp, tp_dp_cp
    calls = []

    def all_reduce(t, op=None, group=None, async_op=False):
        calls.append((group, t.numel()))
        t.mul_(group.size())

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    got = _run(router)
    assert calls == [(tp_dp_cp, E)] * MICRO   # before: the counts went over TP x CP first too, (tp_cp, E) each time
    ref = _reference("global_batch", [g[1] for g in got])
    for (loss, _, grad), (ref_loss, ref_grad) in zip(got, ref):
        assert loss == pytest.approx(ref_loss / 2, rel=1e-6)
        assert_close("global_batch at TP2 x DP2 dL/dlogits", ref_grad / 2, grad, 1e-5)


# one packed row of S x B tokens: four documents, then padding (documents of 5, 12, 3 and 11 tokens; 5 of padding)
CU = [0, 5, 17, 20, 31, S * B]
DOCS = torch.repeat_interleave(torch.tensor([0, 1, 2, 3, -1]), torch.tensor(CU[1:]) - torch.tensor(CU[:-1]))


def _reference_documents(logits, ids):
    """The loss per document (models/moe/router.py, balance=sequence) and the gradient of coeff x (routed tokens) x it
    into the logits [T, E] of one packed row, `ids` [T] each token's document (-1: padding, in none):

        L = sum_d (T_d / T) E sum_e f_de P_de,  f_de = c_de / (k T_d),  P_de = mean over d's tokens of p_e,
        T = sum_d T_d (the padding's tokens in no document)."""
    logits = logits.clone().requires_grad_(True)
    p = logits.float().softmax(dim=-1)
    c = torch.zeros_like(p).scatter(-1, p.detach().topk(K, dim=-1).indices, 1.0)
    docs = [ids == d for d in range(int(ids.max()) + 1)]
    total = sum(int(d.sum()) for d in docs)
    loss = sum(int(d.sum()) / total * E * (c[d].sum(0) / (K * int(d.sum())) * p[d].mean(0)).sum() for d in docs)
    (grad,) = torch.autograd.grad(COEFF * logits.shape[0] * loss, logits)
    return float(loss), grad


def _packed_rows():
    return [x.reshape(S * B, 1, H) for x in _micro_batches()]


def _row_documents():
    """The packed row's documents as its layer hands them to the router (models/lm.py DocumentRoutingLayer)."""
    from models.moe.router import PackedSeqDocuments

    return PackedSeqDocuments(qkv_format="sbhd", documents=DOCS.view(1, -1), num_documents=len(CU) - 1)


def _keep_logits(router) -> list:
    """Makes the router keep the logits of each call, their gradient retained, in the list returned."""
    gating, kept = router.gating, []

    def keep(x):
        kept.append(gating(x))
        kept[-1].retain_grad()
        return kept[-1]

    router.gating = keep
    return kept


def test_sequence_balances_each_document_of_a_packed_row(pgs):
    """With a packed row's documents (as the trainer gives them) each document is balanced on its own, weighted by
    its tokens, the padding in none; before, the row was one sequence (its gradient 0.49 to 1.14 relative RMSE off)."""
    router = _router(pgs, "sequence")
    kept = _keep_logits(router)
    docs = _row_documents()
    for x in _packed_rows():
        router.documents = docs   # as its layer sets it for the call (models/lm.py DocumentRoutingLayer)
        router(x)[0].sum().mul(0).backward()
        router.documents = None
        loss = float(torch.tensor(_tracked()))
        ref_loss, ref_grad = _reference_documents(kept[-1].detach().view(-1, E), DOCS)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert_close("sequence per document dL/dlogits", ref_grad, kept[-1].grad.view(-1, E), 1e-5)
        row = _reference_documents(kept[-1].detach().view(-1, E), torch.zeros_like(DOCS))
        assert rel_rmse(row[1], ref_grad) > 0.3   # the row as one sequence could not pass (measured 0.49 to 1.14)


def _reference_without_padding(balance: str, logits_all, valid):
    """Per packed row (`logits_all` [T, E] each, `valid` [T] bool: the tokens of a document): (loss, gradient into
    the logits) of the micro_batch or global_batch formulas (module docstring) over the valid tokens alone, the
    gradient that of coeff x (valid tokens) x L, the weight megatron gives a micro-batch of padded tokens."""
    out, running, t = [], torch.zeros(E, dtype=torch.float64), int(valid.sum())
    for logits in logits_all:
        logits = logits.clone().requires_grad_(True)
        p = logits.float().softmax(dim=-1)[valid]
        c = torch.zeros_like(p).scatter(-1, p.detach().topk(K, dim=-1).indices, 1.0)
        f = c.sum(0) / (K * t)
        if balance == "global_batch":
            running += c.sum(0).double()
            f = (running / running.sum()).float()
        loss = E * (f * p.mean(0)).sum()
        (grad,) = torch.autograd.grad(COEFF * t * loss, logits)
        out.append((float(loss), grad))
    return out


def _padded_rows():
    """The packed rows, their padding (DOCS -1) one repeated vector as a row's padding tokens are one token id."""
    rows = _packed_rows()
    for x in rows:
        x[DOCS < 0] = x[DOCS < 0][0]
    return rows


@pytest.mark.parametrize("expert_bias", [False, True])
@pytest.mark.parametrize("balance", ["micro_batch", "global_batch"])
def test_a_packed_rows_padding_is_left_out_of_the_balancing(pgs, balance, expert_bias):
    """Given a packed row's documents (as its layer gives them), the balancing loss at micro_batch and global_batch
    is that of the documents' tokens alone: the padding (5 of 36 tokens, one vector) is in no count, no mean
    probability and no token count, and gets no gradient. Counted, the same padding moves the documents' gradient
    by 0.024 to 0.29 relative RMSE (measured; the check: > 0.01, 1,000 x the tolerance of the match)."""
    router = _router(pgs, balance, expert_bias=expert_bias)
    if expert_bias:
        with torch.no_grad():
            router.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))   # moves the choice, not the balancing loss
    kept = _keep_logits(router)
    docs = _row_documents()
    got = []
    for x in _padded_rows():
        router.documents = docs
        router(x)[0].sum().mul(0).backward()
        router.documents = None
        got.append((_tracked(), kept[-1].detach().view(-1, E), kept[-1].grad.view(-1, E)))
    del router.gating
    ref = _reference_without_padding(balance, [g[1] for g in got], DOCS >= 0)
    counted = _reference_without_padding(balance, [g[1] for g in got], torch.ones_like(DOCS, dtype=torch.bool))
    for m, ((loss, _, grad), (ref_loss, ref_grad), (_, counted_grad)) in enumerate(zip(got, ref, counted)):
        assert loss == pytest.approx(ref_loss, rel=1e-6), (balance, m)
        assert_close(f"{balance} with padding, row {m} dL/dlogits", ref_grad, grad, 1e-5)
        assert torch.equal(grad[DOCS < 0], torch.zeros_like(grad[DOCS < 0]))
        assert rel_rmse(counted_grad[DOCS >= 0], ref_grad[DOCS >= 0]) > 0.01


@pytest.mark.parametrize("balance", ["micro_batch", "global_batch", "sequence"])
def test_a_micro_batch_of_padding_alone_adds_no_balancing_loss(pgs, balance):
    """A row that is all padding (a pack whose every sample failed is one padding token): a loss of 0 and no
    gradient at every level, where megatron's count of valid tokens would divide 0 by 0."""
    from models.moe.router import PackedSeqDocuments

    router = _router(pgs, balance)
    docs = PackedSeqDocuments(qkv_format="sbhd", documents=torch.full((1, S * B), -1), num_documents=1)
    x = _packed_rows()[0].clone().requires_grad_(True)
    router.documents = docs
    router(x)[0].sum().mul(0).backward()
    router.documents = None
    assert _tracked() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_the_load_counts_leave_out_a_packed_rows_padding(pgs):
    """RouterStats counts the experts' load (the expert bias's update, moe_load_max) over the documents' tokens:
    the router's top-k of the tokens whose document is not -1."""
    from train.moe_stats import RouterStats

    router = _router(pgs, "micro_batch")
    stats = RouterStats([router], num_layers=1, num_experts=E, dp_size=1, device=torch.device("cpu"))
    docs = _row_documents()
    want = torch.zeros(E, dtype=torch.int64)
    try:
        for x in _padded_rows():
            router.documents = docs
            router(x)
            router.documents = None
            _tracked()   # (clears megatron's process-wide tracker of the loss for the tests after this one)
            with torch.no_grad():
                top = router.gating(x).view(-1, E)[DOCS >= 0].topk(K, dim=-1).indices
            want += torch.bincount(top.reshape(-1), minlength=E)
        assert torch.equal(stats.counts[0], want) and int(want.sum()) == 3 * K * int((DOCS >= 0).sum())
    finally:
        stats.remove()


def _tracked() -> float:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    value = float(tracker["load_balancing_loss"]["values"][0].detach())
    tracker.clear()
    return value


def test_sequence_documents_under_sequence_parallelism(pgs, monkeypatch):
    """TP2 with sequence parallelism, both ranks run here in turn: each routes its half of the row, takes its slice of
    the row's documents, and sums the documents' counts over TP x CP in one all-reduce (stand-in groups: the sum adds
    the other rank's counts, from the plain reference). The ranks' losses add up to the reference's, their gradients
    are its halves."""
    router = _router(pgs, "sequence")
    router.config.sequence_parallel, router.config.tensor_model_parallel_size = True, 2
    docs = _row_documents()
    half = S * B // 2
    for x in _packed_rows():
        with torch.no_grad():
            logits = router.gating(x).view(-1, E)
        chosen = torch.zeros_like(logits).scatter(-1, logits.topk(K, dim=-1).indices, 1.0).double()
        halves = []   # each rank's counts per document
        for r in (0, 1):
            ids, slots = DOCS[r * half:(r + 1) * half], chosen[r * half:(r + 1) * half]
            halves.append(torch.zeros(len(CU) - 1, E, dtype=torch.float64).index_add_(
                0, ids.clamp_min(0), slots * (ids >= 0)[:, None]))
        losses, grads, calls = [], [], []
        for r in (0, 1):
            group = _Group(2)
            group.rank = lambda r=r: r
            router.tp_group, router.tp_cp_group = group, group

            def all_reduce(t, op=None, group=None, async_op=False, r=r):
                calls.append(t.shape)
                t.add_(halves[1 - r])

            monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
            part = x[r * half:(r + 1) * half].clone().requires_grad_(True)
            router.documents = docs
            router(part)[0].sum().mul(0).backward()
            router.documents = None
            losses.append(_tracked())
            grads.append(part.grad)
        monkeypatch.undo()
        assert calls == [(len(CU) - 1, E)] * 2   # one all-reduce of every document's counts per rank
        ref_loss, ref_grad = _reference_documents(logits, DOCS)
        assert sum(losses) == pytest.approx(ref_loss, rel=1e-6)
        # the gradient into the router's input: the reference's into the logits through the router weight
        assert_close("sequence per document at TP2 dL/dx", ref_grad @ router.weight.detach(), torch.cat(grads)
                     .view(-1, H), 1e-5)


def test_each_layer_call_routes_with_its_own_documents(pgs):
    """The model hands each MoE layer's router the documents of the call's packed row; under full recompute a layer
    run again in the backward has its own micro-batch's, though a later micro-batch's forward ran in between (as the
    pipeline schedules interleave them)."""
    from models.config import ModelParallelSizes
    from models.lm import build_lm, transformer_config
    from models.moe.router import PackedSeqDocuments

    lm = _lm(moe_balance="sequence", num_layers=2)
    cfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True, recompute="full")
    model = build_lm(lm, cfg, pg_collection=pgs, pp_rank=0, pp_size=1).train()
    routers = [m for m in model.modules() if hasattr(m, "documents")]
    seen = []
    for r in routers:
        r.register_forward_hook(lambda r, *_: seen.append((r.layer_number, r.documents.num_documents)))
    tokens = torch.arange(2 * S).remainder(lm.vocab_size).view(1, -1)
    pos = torch.arange(2 * S).view(1, 1, -1).expand(3, 1, -1)
    outs = []
    for cuts in ([0, 5, 2 * S], [0, 3, 9, 2 * S]):   # 2 and 3 documents
        cu = torch.tensor(cuts, dtype=torch.int32)
        ids = torch.repeat_interleave(torch.arange(len(cuts) - 1), cu[1:] - cu[:-1]).view(1, -1)
        psp = PackedSeqDocuments(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=2 * S,
                                 max_seqlen_kv=2 * S, documents=ids, num_documents=len(cuts) - 1)
        outs.append(model(tokens, pos, None, labels=tokens, packed_seq_params=psp))
    outs[0].sum().backward()   # the first micro-batch's layers run again here, after the second's forward
    outs[1].sum().backward()
    assert seen == [(1, 2), (2, 2), (1, 3), (2, 3), (2, 2), (1, 2), (2, 3), (1, 3)], seen
    assert all(r.documents is None for r in routers)   # nothing held past the call


def _trainer_step(groups=(0, 2, 1, 0, -1), **inputs):
    """_forward_step (StepInputs `inputs`) on the packed row of CU, every token 1 and with loss, its segments in the
    document `groups` (-1: a video pack's padding): what the model was given (tokens, pos, labels, psp, the packed
    params) and the loss function."""
    from train.trainer import StepInputs, _forward_step

    n = S * B
    batch = {"tokens": torch.ones(1, n, dtype=torch.int64), "labels": torch.ones(1, n, dtype=torch.int64),
             "loss_mask": torch.ones(1, n), "position_ids": torch.arange(n).view(1, -1),
             "cu_seqlens": torch.tensor(CU, dtype=torch.int32), "doc_groups": torch.tensor(groups)}
    seen = {}

    def model(tokens, pos, _mask, labels, packed_seq_params):
        seen.update(tokens=tokens, pos=pos, labels=labels, psp=packed_seq_params)
        return torch.zeros(tokens.shape)

    # _forward_step sets the micro-batch's loss tokens for the routers: tests/conftest.py resets them for the next test
    _, loss_func = _forward_step(StepInputs(device=torch.device("cpu"), vocab_size=16, **inputs), iter([batch]), model)
    return seen, loss_func


def test_the_trainer_gives_each_token_its_document():
    """_forward_step gives the model each token's document of a packed row, -1 for a video pack's padding segment
    (its group -1) and for the segment a KSA row is padded with (from real_segments on)."""
    from train.trainer import token_documents

    seen, _ = _trainer_step()
    assert torch.equal(seen["psp"].documents, DOCS.view(1, -1)) and seen["psp"].num_documents == len(CU) - 1
    torch.testing.assert_close(seen["psp"].cu_seqlens_q, torch.tensor(CU, dtype=torch.int32))
    parts = torch.repeat_interleave(torch.arange(5), torch.tensor(CU[1:]) - torch.tensor(CU[:-1])).view(1, -1)
    assert torch.equal(token_documents(parts, 5, real_segments=4, doc_groups=None), DOCS.view(1, -1))
    assert torch.equal(token_documents(parts, 5, real_segments=None, doc_groups=None), parts)
    # the padding segment ends the row: the core attentions leave it out (models/attention/dense.py documents_part)
    assert (seen["psp"].pad_tail, seen["psp"].pad_tail_segments, seen["psp"].max_seqlen_q) == (36 - 31, 1, 12)


def test_the_trainer_pads_a_short_row_as_far_as_the_layout_needs():
    """A packed row of 36 tokens whose layout takes 40 (StepInputs.row_length, parallel/layout.py) is given the model
    with one more segment of 4 padding tokens: no loss, document -1, and named with the padding segment before it
    (5 + 4 tokens in 2 segments) for the core attentions; a row already as long as the layout takes is left."""
    n = S * B
    for length in (40, 36):
        seen, loss_func = _trainer_step(model_seq=40, row_length=lambda tokens, model_len, length=length: length)
        psp = seen["psp"]
        assert seen["tokens"].shape[-1] == length and psp.cu_seqlens_q.tolist() == CU + [40] * (length > n)
        docs = torch.cat([DOCS, torch.full((length - n,), -1)]).view(1, -1)
        assert torch.equal(psp.documents, docs)
        assert (psp.pad_tail, psp.pad_tail_segments) == (length - 31, 1 + (length > n))
        assert torch.equal(seen["pos"][..., n:], torch.arange(length - n).expand(3, 1, -1))
        mask = loss_func.args[0]                                  # the loss mask _loss_func is given
        assert mask.shape[-1] == length and not mask[..., n:].any() and mask[..., :n].all()


@pytest.mark.parametrize("groups,row", [((0, -1, 1, -1, -1), 80), ((0, -1, 1, 0, 2), 80), ((0, -1, 1, -1, -1), 0)])
def test_the_trainer_names_the_padding_at_a_ksa_rows_end(groups, row):
    """A KSA row (summary slots inserted after every 4 tokens of each document, then padded to the model's 80 tokens
    by one more segment; row 0: not padded, its 43 tokens) ends with padding the trainer names from the host's
    bounds (no device sync): the trailing padding segments' tokens after the insertion (build_summary_layout's, on
    the device, here the reference) and the longest segment before them."""
    seen, _ = _trainer_step(groups, ksa_chunk=4, model_seq=row or 43)  # 36 tokens + 7 slots
    psp = seen["psp"]
    seen["s"] = seen["tokens"].shape[-1]
    bounds = psp.cu_seqlens_q.tolist()                      # the row's segments as the model gets them
    pad = [g < 0 for g in groups] + [True] * (len(bounds) - 1 - len(groups))
    k = 0
    while k < len(pad) - 1 and pad[-1 - k]:
        k += 1
    kept = bounds[:len(bounds) - k]
    assert bounds[-1] == seen["s"] and len(bounds) - 1 == 5 + (row > 0)
    assert (psp.pad_tail, psp.pad_tail_segments) == (seen["s"] - kept[-1], k)
    assert psp.max_seqlen_q == max(b - a for a, b in zip(kept[:-1], kept[1:]))
