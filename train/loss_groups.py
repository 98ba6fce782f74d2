"""The loss of each data source and each kind of document: a step's (and a held-out set's) LM loss split by where
its tokens came from.

A video run's micro-batch carries `doc_groups` (data/video_stream.py): per segment of its packed row, the group of the
document there, source * 3 + kind (DOC_KINDS: video, image, text), -1 for the padding segment. Each loss token
adds its loss and a count to its group (group_sums, on the device, in the loss function); the step folds the
[2 x groups] sums into the vector of its loss sums, which the one all-reduce of the step's metrics already sums over
the world (train/metrics.py sum_over_world): no collective of its own. Only the LM loss: the DSA indexer KL, the
KSA distillation terms and the MoE balancing loss are not split.
"""

from __future__ import annotations

import torch

from data.video.packing import DOC_KINDS

SOURCE_KEY, KIND_KEY = "loss_src", "loss_kind"   # metrics: <key>/<name> the mean loss, <key>_tokens/<name> its tokens
GROUPS_KEY = "loss_groups"   # the loss report's entry that group_sums fills (train/trainer.py _loss_func)


def token_groups(parts: torch.Tensor, doc_groups: torch.Tensor) -> torch.Tensor:
    """Each token's group [b, S] (int64, -1: none) from its part (train/nonfinite.py part_ids: its segment of the
    packed row) and the row's `doc_groups` (one per segment); a segment past them (the padding a KSA row is given)
    has none."""
    g = doc_groups.reshape(-1).to(parts.device, torch.int64)
    if g.numel() == 0:
        return torch.full_like(parts, -1)
    inside = parts < g.numel()
    return torch.where(inside, g[parts.clamp(max=g.numel() - 1)], -1)


def group_sums(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, groups: torch.Tensor,
               n_groups: int) -> torch.Tensor:
    """[2 * n_groups] float64 on the device: each group's sum of masked per-token losses, then its loss tokens.
    A token of no group (-1) counts in neither."""
    loss = (per_token_loss.float().reshape(-1) * loss_mask.reshape(-1).float()).double()
    mask = loss_mask.reshape(-1).double()
    g = groups.reshape(-1).to(loss.device)
    keep = g >= 0
    idx = torch.where(keep, g, 0)
    out = loss.new_zeros(2 * n_groups)
    out[:n_groups].index_add_(0, idx, torch.where(keep, loss, 0.0))
    out[n_groups:].index_add_(0, idx, torch.where(keep, mask, 0.0))
    return out


def group_metrics(sums: torch.Tensor, sources: list[str], *, by_source: bool = True, prefix: str = "") -> dict:
    """The mean loss and the loss tokens of each source (by_source, with more than one) and each kind of document that
    had loss tokens, from the world's sum of group_sums over a step or an evaluation: `<prefix>loss_src/<source>`,
    `<prefix>loss_src_tokens/<source>`, `<prefix>loss_kind/<kind>`, `<prefix>loss_kind_tokens/<kind>`."""
    n = len(sources) * len(DOC_KINDS)
    if sums.numel() != 2 * n:
        raise AssertionError(f"{sums.numel()} loss group sums for {len(sources)} sources")
    loss = sums[:n].view(len(sources), len(DOC_KINDS))
    count = sums[n:].view(len(sources), len(DOC_KINDS))
    out = {}
    axes = ([(SOURCE_KEY, sources, 1)] if by_source and len(sources) > 1 else []) + [(KIND_KEY, list(DOC_KINDS), 0)]
    for key, names, dim in axes:
        total, tokens = loss.sum(dim), count.sum(dim)
        for i, name in enumerate(names):
            if tokens[i] > 0:
                out[f"{prefix}{key}/{name}"] = float(total[i] / tokens[i])
                out[f"{prefix}{key}_tokens/{name}"] = int(tokens[i])
    return out


def is_group_key(key: str) -> bool:
    """Whether a metric is one of group_metrics' (the step line shows them through `compact` alone)."""
    return key.split("/", 1)[0] in (SOURCE_KEY, KIND_KEY, SOURCE_KEY + "_tokens", KIND_KEY + "_tokens")
