"""Packed documents that cross context-parallel rank boundaries, through the real model (no trainer).

    torchrun --standalone --nproc_per_node N tests/dist/cp_packed_worker.py OUT.json RECIPE[,RECIPE..] CP [CP ...]

CP is a degree with an optional token layout, "2" (the default `parallel.cp_split`), "2:document" or
"2:sequence". For each (1 first, the reference), on the same N processes: megatron's process
groups for `parallel.cp=CP` (the rest data parallel), the recipe's language model with the
layout-invariant initialisation and, as the trainer does, parallel/context's attention functions injected
(`build_lm(..., cp_ops=ContextParallelAttention(split))`), ONE packed micro-batch (batch 1, documents of odd
lengths so that they start and end inside CP chunks, positions restarting per document, KSA summary slots
inserted for KSA models, then a segment of padding named as the trainer names it), forward through
`parallel.context.batch.split_batch_for_cp` with the same split exactly as the trainer calls it, backward of the
summed per-token loss. Gradients are then summed over the CP group (what DDP does over DP x CP) and compared, on
rank 0, against CP 1: loss sum, token count and every parameter's gradient. DSA/KSA extras (the indexer KL attached
in DSA layers, the summary projections) are part of the gradients compared. Writes
{recipe: {CP: {"loss": .., "tokens": .., "grad_rel_err": {param: rel RMSE}}}} (keyed by the CP argument as given).
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

DOCS = [45, 38, 37, 3]  # text tokens per document: 123; odd, so documents straddle CP chunk boundaries
PAD_MIN = 37  # the padding segment's least length (module docstring)


def packed_batch(lm, device):
    """tokens / labels / mask [1, S], positions [3, 1, S] (restarting per document), global cu_seqlens."""
    from models.ksa_tokens import insert_summary_slots

    g = torch.Generator().manual_seed(7)
    text = sum(DOCS)
    tokens = torch.randint(0, lm.vocab_size, (1, text), generator=g)
    labels = torch.randint(0, lm.vocab_size, (1, text), generator=g)
    mask = torch.ones(1, text)
    cu = torch.tensor([0] + DOCS).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    pos = torch.stack([pos, pos // 2, pos // 3])  # distinct t/h/w rows: exercises every mrope section
    if lm.uses_ksa:
        sb = insert_summary_slots(tokens, chunk=lm.ksa.chunk, num_summary=lm.ksa.num_summary, cu_seqlens=cu,
                                  labels=labels, loss_mask=mask, position_ids=pos, slot_ids_from=lm.vocab_size,
                                  ignore_index=0)
        tokens, labels, mask, pos, cu = sb.input_ids, sb.labels, sb.loss_mask, sb.position_ids, sb.cu_seqlens
    return [t.to(device) for t in (tokens.reshape(1, -1), labels.reshape(1, -1), mask.reshape(1, -1), pos)], \
        cu.to(device=device, dtype=torch.int32)


def run_one(recipe: str, cp: int, pad_to: int,
            split: str | None = None) -> tuple[float, float, dict[str, torch.Tensor]]:
    from models.init import init_layout_invariant
    from models.lm import build_lm, transformer_config
    from parallel.context import ContextParallelAttention
    from parallel.context.batch import cp_share, split_batch_for_cp
    from parallel.groups import build_process_groups, seed_all
    from parallel.megatron_compat import set_balancing_tokens
    from parallel.layout import ParallelLayout
    from train.config import to_config
    from train.launch import compose_config
    from train.nonfinite import part_ids
    from train.trainer import packed_params, token_documents, trailing_padding

    cfg = to_config(compose_config([f"recipe={recipe}", "parallel=single", f"parallel.cp={cp}"]
                                   + ([f"parallel.cp_split={split}"] if split else [])))
    lm = cfg.model.lm
    layout = ParallelLayout.build(cfg.parallel, world_size=dist.get_world_size(), lm=lm)
    pgs = build_process_groups(layout)
    seed_all(cfg.seed, pgs)
    tconfig = transformer_config(lm, layout.model_sizes(), bf16=False, use_cpu_initialization=False)
    cp_ops = ContextParallelAttention(split=layout.cp_split) if cp > 1 else None
    model = build_lm(lm, tconfig, pg_collection=pgs, pp_rank=0, pp_size=1, cp_ops=cp_ops)
    init_layout_invariant([model], seed=cfg.seed, std=lm.init_std, num_layers=lm.num_layers)
    model.train()
    (tokens, labels, mask, pos), cu = packed_batch(lm, torch.device("cpu"))
    seq = tokens.shape[-1]
    # a padding document with no loss, at least PAD_MIN tokens, so that every CP degree tested splits evenly; named
    # as padding as the trainer names a video pack's (its tokens' document -1; not attended, no logits, in no KL),
    # and long enough to take a share of every rank's tokens at cp 2
    extra = PAD_MIN + (-(seq + PAD_MIN)) % pad_to
    tokens = torch.cat([tokens, tokens.new_zeros(1, extra)], -1)
    labels = torch.cat([labels, labels.new_zeros(1, extra)], -1)
    mask = torch.cat([mask, mask.new_zeros(1, extra)], -1)
    pos = torch.cat([pos, torch.arange(extra).expand(3, 1, extra)], -1)
    cu = torch.cat([cu, cu.new_tensor([seq + extra])])
    lengths = (cu[1:] - cu[:-1]).tolist()
    kwargs = {"packed_seq_params": packed_params(cu, tail=trailing_padding(lengths, [False] * (len(lengths) - 1)
                                                                           + [True]))}
    group = pgs.cp if cp > 1 else None
    parts, full_mask = part_ids(tokens.shape, cu, tokens.device), mask
    tokens, labels, mask, pos, kwargs = split_batch_for_cp(tokens, labels, mask, pos, kwargs, group,
                                                           split=layout.cp_split)
    if cp > 1:
        parts = cp_share(parts, kwargs, group, split=layout.cp_split)
    documents = token_documents(parts, len(lengths), real_segments=len(lengths) - 1, doc_groups=None)
    kwargs["packed_seq_params"] = dataclasses.replace(kwargs["packed_seq_params"], documents=documents,
                                                      num_documents=len(lengths))
    # the routers weigh their balancing loss by the micro-batch's LM-loss tokens over its whole row (the trainer's
    # call: the padding's share differs between the CP ranks)
    set_balancing_tokens(full_mask.sum().to(torch.int64))
    out = model(tokens, pos, None, labels=labels, **kwargs)
    loss = (out.float() * mask).sum()
    loss.backward()
    stats = torch.tensor([loss.item(), mask.sum().item()], dtype=torch.float64)
    grads = {n: (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).detach().clone()
             for n, p in model.named_parameters() if p.grad is not None or getattr(p, "main_grad", None) is not None}
    if cp > 1:
        dist.all_reduce(stats, group=pgs.cp)
        for g in grads.values():
            dist.all_reduce(g, group=pgs.cp)
    return float(stats[0]), float(stats[1]), grads


def main(out: str, recipes: str, *specs: str) -> None:
    recipes = recipes.split(",")
    from parallel.groups import init_distributed, teardown

    init_distributed()
    pad_to = 2 * max(int(c.split(":")[0]) for c in specs)
    results = {}
    for recipe in recipes:
        ref_loss, ref_n, ref = run_one(recipe, 1, pad_to)
        result = results[recipe] = {1: {"loss": ref_loss, "tokens": ref_n}}
        for spec in specs:
            cp, _, split = spec.partition(":")
            cp = int(cp)
            if cp == 1:
                continue
            loss, n, grads = run_one(recipe, cp, pad_to, split or None)
            assert grads.keys() == ref.keys(), sorted(set(grads) ^ set(ref))
            err = {name: float((grads[name].double() - ref[name].double()).norm()
                               / ref[name].double().norm().clamp_min(1e-30)) for name in ref}
            result[spec] = {"loss": loss, "tokens": n, "grad_rel_err": err}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
