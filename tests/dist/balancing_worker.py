"""The routers' gradients of one training step's forward and backward, on a batch where a known share of the tokens
carries the LM loss, for tests/dist/test_balancing_strength.py.

    run(OUT, RUN_ROOT, SPEC): SPEC is 'name=overrides;...' as in layouts_driver.py; an override `mask=partial` gives
    each micro-batch its own share of loss tokens (below), `mask=all` keeps every token's loss (text rows);
    `docs=packed` makes each micro-batch (one row) a packed row of three documents and padding (packed_documents).

Each entry builds the trainer (train/trainer.py) from its overrides, draws one step's micro-batches from its data, sets
their loss mask, and runs the trainer's schedule over them (forward, backward, finalize: the data-parallel sum and the
division by the step's loss tokens). Rank 0 writes, per entry: each MoE layer's router weight gradient (global layer
number -> values; gathered from every pipeline stage), each micro-batch's loss tokens, and on a one-process entry
without recompute (or a data-parallel-only one with model.lm.moe_balance other than micro_batch, from every replica's
micro-batches) the reference gradient written out here in plain torch from the same weights and micro-batches:

    J = ( sum_mb sum_t mask_t * ce_t  +  coeff * sum_mb n_mb * sum_layers switch_(layer, mb) ) / sum_mb n_mb

n_mb the micro-batch's loss tokens, switch = E / (k T^2) * sum_e count_e * sum_t softmax(x W^T)_te over its T routed
tokens (the Switch / megatron formula, counts not differentiated), i.e. the mean LM loss plus coeff x the
loss-token-weighted mean of the micro-batches' switch losses, as transformers' Qwen3-MoE adds coeff x its balancing loss
to the mean LM loss. global_batch: E sum_e f_e P_e with f the step's counts so far (every replica's micro-batches up
to this one's position) / their sum and P_e the mean probability; sequence: the mean over rows of each row's switch,
or in a packed row the mean over its documents of each one's, weighted by their tokens (the padding in none).
The model's own balancing loss is off (coefficient 0) while the reference runs.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def partial_mask(batch: dict) -> dict:
    """The micro-batch with its own share of loss tokens, decided by its tokens alone (so every layout masks the same
    micro-batch alike): none when its first token is a multiple of 3, else row r keeps the loss of every
    (1 + (its first token mod 4))-th position."""
    tokens = batch["tokens"]
    mask = torch.zeros(tokens.shape, dtype=torch.float32)
    if int(tokens[0, 0]) % 3:
        pos = torch.arange(tokens.shape[1])
        for r in range(tokens.shape[0]):
            mask[r] = (pos % (1 + int(tokens[r, 0]) % 4) == 0).float()
    return {**batch, "loss_mask": mask}


def packed_documents(batch: dict) -> dict:
    """The micro-batch (one row) as a packed row of three documents and a padding segment, decided by its tokens
    alone: cu_seqlens, doc_groups (-1: the padding, which carries no loss, as a video pack's)."""
    tokens = batch["tokens"]
    S = tokens.shape[1]
    assert tokens.shape[0] == 1, "packed documents need train.micro_batch_size=1"
    a, b = 9 + int(tokens[0, 0]) % 24, 50 + int(tokens[0, 1]) % 30
    cu = torch.tensor([0, a, b, S - 12 - int(tokens[0, 2]) % 8, S], dtype=torch.int32)
    mask = batch["loss_mask"].clone()
    mask[:, int(cu[-2]):] = 0
    return {**batch, "loss_mask": mask, "cu_seqlens": cu, "doc_groups": torch.tensor([0, 0, 0, -1])}


def _routers(chunks) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]


def _switch(balance: str, probs: torch.Tensor, counts: torch.Tensor, running: torch.Tensor,
            documents: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's balancing loss on one micro-batch ([s, b, E] probabilities and top-k counts, float64) at the level
    `balance` (models/moe/router.py); `running`: the step's counts so far over every replica (global_batch);
    `documents`: a packed row's [s] document of each token (-1: padding, in none)."""
    E, k = probs.shape[-1], int(counts[0, 0].sum())
    if balance == "sequence" and documents is not None:   # each document's own loss, weighted by its tokens
        docs = [documents == d for d in range(int(documents.max()) + 1)]
        total = sum(int(d.sum()) for d in docs)
        return sum(int(d.sum()) / total * E * (counts[d, 0].sum(0) / (k * int(d.sum())) * probs[d, 0].mean(0)).sum()
                   for d in docs)
    if balance == "sequence":   # each row's own loss, their mean
        return (E * (counts.sum(0) / (k * counts.shape[0]) * probs.mean(0)).sum(-1)).mean()
    if balance == "global_batch":
        return E * (running / running.sum() * probs.mean((0, 1))).sum()
    T = probs.shape[0] * probs.shape[1]
    return E / (k * T * T) * (counts.sum((0, 1)) * probs.sum((0, 1))).sum()


def reference_grads(module, replicas: list[list[dict]], coeff: float, balance: str = "micro_batch"
                    ) -> tuple[dict, dict]:
    """dJ/dW of every router weight of a model holding every layer (J above; float64 sums of the fp32 forward), and
    the same of the mean LM loss alone (J at coeff 0); each {layer number: gradient}. `replicas`: each data-parallel
    replica's micro-batches in the order its schedule runs them (the global_batch counts at position m sum every
    replica's micro-batches up to m)."""
    from train.trainer import packed_params

    routers = _routers([module])
    routed: list[tuple[int, torch.Tensor]] = []

    def hook(router, args):
        x = args[0]   # [s, b, h]
        probs = (x.reshape(-1, x.shape[-1]).float() @ router.weight.float().t()).softmax(dim=-1)  # [s*b, E]
        counts = torch.zeros_like(probs).scatter(1, probs.detach().topk(router.topk, dim=-1).indices, 1.0)
        routed.append((router.layer_number, probs.double().view(*x.shape[:2], -1), counts.double().view(*x.shape[:2],
                                                                                                       -1)))

    saved = [r.config.moe_aux_loss_coeff for r in routers]
    handles = [r.register_forward_pre_hook(hook) for r in routers]
    try:
        for r in routers:
            r.config.moe_aux_loss_coeff = 0.0
        lm_sum = balancing = torch.zeros((), dtype=torch.float64)
        n_all, running = 0.0, {}
        for m in range(len(replicas[0])):
            at_m = []
            for mbs in replicas:
                mb = mbs[m]
                routed.clear()
                pos = mb["position_ids"].unsqueeze(0).expand(3, -1, -1)
                packed = {} if "cu_seqlens" not in mb else {"packed_seq_params": packed_params(mb["cu_seqlens"])}
                per_token = module(mb["tokens"], pos, None, labels=mb["labels"], **packed)  # [b, s]
                n = float(mb["loss_mask"].sum())
                lm_sum = lm_sum + (per_token.double() * mb["loss_mask"].double()).sum()
                n_all += n
                at_m.append((n, list(routed), _documents(mb)))
                for layer, _, counts in routed:
                    running[layer] = running.get(layer, 0) + counts.sum((0, 1))
            for n, layers, docs in at_m:
                balancing = balancing + coeff * n * torch.stack([_switch(balance, probs, counts, running[layer], docs)
                                                                 for layer, probs, counts in layers]).sum()
        weights = [r.weight for r in routers]
        grads = torch.autograd.grad((lm_sum + balancing) / n_all, weights, retain_graph=True)
        lm_grads = torch.autograd.grad(lm_sum / n_all, weights)
    finally:
        for h in handles:
            h.remove()
        for r, c in zip(routers, saved):
            r.config.moe_aux_loss_coeff = c
    return ({r.layer_number: g.detach().float() for r, g in zip(routers, grads)},
            {r.layer_number: g.detach().float() for r, g in zip(routers, lm_grads)})


def _documents(mb: dict) -> torch.Tensor | None:
    """A packed row's [s] document of each token, -1 for its padding segment (packed_documents), else None."""
    if "cu_seqlens" not in mb:
        return None
    cu = mb["cu_seqlens"].long()
    ids = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
    return torch.where(mb["doc_groups"][ids] < 0, -1, ids)


def run(out: str, run_root: str, spec: str) -> None:
    import torch.distributed as dist

    from train.launch import compose_config, validate
    from train.noise import silence_known_warnings

    silence_known_warnings()
    results = {}
    for item in spec.split(";"):
        name, overrides = item.split("=", 1)
        ov = [o for o in overrides.split() if not o.startswith(("mask=", "docs="))]
        mode = [o.split("=", 1)[1] for o in overrides.split() if o.startswith("mask=")][-1]
        packed = "docs=packed" in overrides.split()
        cfg, layout = validate(compose_config(ov + [f"run_dir={Path(run_root) / name}"]))
        from train.trainer import Trainer

        trainer = Trainer(cfg, layout)
        n = trainer.num_microbatches
        drawn = [[next(s) for _ in range(n)] for s in trainer.streams]  # every model chunk's micro-batches
        if mode == "partial":
            drawn = [[partial_mask(mb) for mb in chunk] for chunk in drawn]
        if packed:
            drawn = [[packed_documents(mb) for mb in chunk] for chunk in drawn]
        for m in trainer.model:
            m.zero_grad_buffer()
        trainer._schedule([iter(chunk) for chunk in drawn], n, trainer.step_inputs, forward_only=False)
        chunks = [m.module for m in trainer.model]
        own = {r.layer_number: r.weight.main_grad.detach().float().clone() for r in _routers(chunks)}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {k: v.tolist() for k, v in own.items()})
        tokens = [None] * dist.get_world_size()
        dist.all_gather_object(tokens, [float(mb["loss_mask"].sum()) for mb in drawn[0]])
        entry = {"grads": {}, "loss_tokens": tokens}
        for g in gathered:
            for k, v in g.items():
                entry["grads"].setdefault(str(k), v)
        # the reference where every rank holds the whole model: one process, or, for a level other than micro_batch,
        # data parallelism alone (rank 0, from every replica's micro-batches); with recompute no graph reaches the
        # routers
        replicas = [None] * dist.get_world_size()
        dist.all_gather_object(replicas, drawn[0])
        wanted = dist.get_world_size() == 1 or cfg.model.lm.moe_balance != "micro_batch"
        if wanted and cfg.parallel.recompute == "none" and layout.dp == dist.get_world_size() and dist.get_rank() == 0:
            ref, ref_lm = reference_grads(chunks[0], replicas, cfg.model.lm.moe_aux_loss_coeff,
                                          cfg.model.lm.moe_balance)
            entry["reference"] = {str(k): v.tolist() for k, v in ref.items()}
            entry["reference_lm"] = {str(k): v.tolist() for k, v in ref_lm.items()}
        results[name] = entry
        trainer.close()
        del trainer
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))
    from parallel.groups import teardown

    teardown()
