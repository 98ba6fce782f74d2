"""The routers' health per training step: how evenly the experts were used, and the load-balancing loss.

A mixture-of-experts run can look fine in its loss while its routers collapse onto a few experts (the
others then learn nothing); these numbers show it the step it starts. Three scalars go into each step's
metrics (console, metrics.jsonl, wandb):

- `moe_load_max`: over the MoE layers, the largest (tokens of the busiest expert / mean tokens per expert)
  in the step, counted over the whole global batch (every data-, context-, sequence-parallel rank's tokens
  and every micro-batch). 1.0 is a perfect balance; top-k of E experts all sent to the same k experts
  gives E / k. `moe_load_max_layer` is the layer it was found in (0-based).
- `moe_idle_experts`: (layer, expert) pairs that received no token in the step.
- `moe_lb_loss`: megatron-core's load-balancing (switch) loss divided by its coefficient, averaged over
  the MoE layers and the step's micro-batches (1.0 at a perfect balance, from the router's own soft
  probabilities; only while `model.lm.moe_aux_loss_coeff` > 0). A plain mean: the gradient weighs each
  micro-batch's loss by its LM-loss tokens instead (parallel/megatron_compat.py fix 2). With
  `model.lm.moe_balance=global_batch` each micro-batch's loss counts the load f over the step so far on every
  data-parallel replica (from the step's whole global batch at its last micro-batch; a global batch balanced over
  its domains shows 1.0 even where single micro-batches are not); with `sequence` it is the token-weighted mean of
  each document's own loss (each row's without documents; models/moe/router.py).

- `moe_bias_min` / `moe_bias_max` (with `model.lm.moe_expert_bias`): the range, over every layer and expert, of the
  auxiliary-loss-free routing bias the step routed with (models/moe/router.py); it widens while the routers
  lean on a few experts and stays within a few update steps of itself once the load is balanced.

The expert counts come from a forward hook on each megatron `TopKRouter` (its routing map summed over
tokens; a packed row's padding is routed to no expert: models/moe/router.py `routing`), kept on the device until
the step's end. A router forward is counted when it runs in training
mode with gradients enabled, the rule by which megatron logs its balancing loss: under full recompute a
layer's first forward runs without gradients and its rerun inside the backward is counted (the same
routing), and a KSA distillation teacher's pass (the same model, without gradients) and evaluation
(routers in eval mode) are not. Megatron's process-wide loss tracker is read and zeroed here every step
(it otherwise sums over the whole run).

Reduction: the counts and losses of all ranks are summed over the world, in the one all-reduce that also sums
the step's loss and loader metrics (train/metrics.sum_over_world). Each token is
routed on exactly one rank of a pipeline stage's tensor x context x data-parallel ranks (sequence
parallelism is always on with TP > 1 for MoE), and a layer lives on one stage, so the sum of the counts is
the global count, identical on every rank after the all-reduce: `update_biases` moves each router's bias from
it, the same on every rank that holds the layer, with no collective of its own. Each layer's bias is added to the
sum by one rank of those holding it (rank 0 of its tensor x data x context-parallel group). The balancing loss of
a tensor x context rank is its share of its data-parallel
replica's loss (megatron sums it over that group), so the world sum is divided by the data-parallel size
and by the micro-batch count.
"""
from __future__ import annotations

import torch

LB_LOSS = "load_balancing_loss"  # megatron's tracker name for the switch loss (aux_loss / coeff)


class RouterStats:
    """Collects per-expert token counts from the routers of `chunks` (a model's chunks) over a step."""

    def __init__(self, chunks, *, num_layers: int, num_experts: int, dp_size: int, device: torch.device):
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_layers, self.num_experts, self.dp_size = num_layers, num_experts, dp_size
        self.device = device
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.routers = [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]
        self.handles = [r.register_forward_hook(self._count) for r in self.routers]
        # routers with an auxiliary-loss-free bias (models/moe/router.py BiasedTopKRouter)
        self.biased = [r for r in self.routers if isinstance(getattr(r, "expert_bias", None), torch.Tensor)]
        # routers whose balancing loss counts the load over the step (model.lm.moe_balance=global_batch)
        self.balanced = [r for r in self.routers if hasattr(r, "reset_balance")]
        self.reset_balance()

    def reset_balance(self) -> None:
        """A step begins: the global-batch balancing counts start at zero (models/moe/router.py)."""
        for r in self.balanced:
            r.reset_balance()

    def _count(self, router, _inputs, output) -> None:
        if not (router.training and torch.is_grad_enabled()) or router.layer_number is None:
            return
        routing_map = output[1]  # [tokens, experts] bool (a packed row's padding: no expert's)
        self.counts[router.layer_number - 1] += routing_map.sum(dim=0)

    def step_vector(self) -> torch.Tensor:
        """This rank's counts and tracked balancing losses of the step, [layers x experts + layers] in float64 on the
        device (counts exact up to 2^53), to be summed over the world (train/metrics.sum_over_world); both
        accumulators are zeroed. Every rank contributes one per step (a rank without routers, zeros). With biased
        routers, 2 x layers more: each layer's bias min and max, from one of the ranks that hold it."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        tracked = get_moe_layer_wise_logging_tracker().get(LB_LOSS)
        lb = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        if tracked is not None:
            values = tracked["values"].detach().to(self.device, torch.float64)
            lb[:min(len(values), self.num_layers)] = values[:self.num_layers]
        flat = torch.cat([self.counts.to(torch.float64).flatten(), lb])
        if self.biased:
            rng = torch.zeros(2, self.num_layers, dtype=torch.float64, device=self.device)
            for r in self.biased:
                if r.layer_number is not None and (r.tp_dp_cp_group is None or r.tp_dp_cp_group.rank() == 0):
                    b = r.expert_bias.detach().to(self.device, torch.float64)
                    rng[:, r.layer_number - 1] = torch.stack([b.min(), b.max()])
            flat = torch.cat([flat, rng.flatten()])
        clear_aux_losses_tracker()
        self.counts.zero_()
        self.reset_balance()
        return flat

    def metrics_from(self, flat: torch.Tensor, num_microbatches: int) -> dict:
        """The step's scalars (above) from the world's sum of step_vector (on the host)."""
        n = self.num_layers * self.num_experts
        counts = flat[:n].view(self.num_layers, self.num_experts)
        lb = flat[n:n + self.num_layers]
        routed = counts.sum(dim=1) > 0  # the MoE layers (a step that routed nothing reports nothing)
        if not bool(routed.any()):
            return {}
        ratio = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-30)
        ratio = torch.where(routed, ratio, torch.zeros_like(ratio))
        worst = int(ratio.argmax())
        out = {"moe_load_max": float(ratio[worst]), "moe_load_max_layer": worst,
               "moe_idle_experts": int((counts[routed] == 0).sum())}
        if bool((lb != 0).any()):  # balancing loss on (coefficient > 0) and tracked on some rank
            out["moe_lb_loss"] = float(lb[routed].sum() / routed.sum() / (self.dp_size * max(num_microbatches, 1)))
        if self.biased:
            rng = flat[n + self.num_layers:].view(2, self.num_layers)
            out["moe_bias_min"], out["moe_bias_max"] = float(rng[0].min()), float(rng[1].max())
        return out

    def update_biases(self, flat: torch.Tensor, rate: float) -> None:
        """After an applied step: each biased router whose weights train moves its bias by `rate` toward balance
        (models/moe/router.py updated_expert_bias) from its layer's count in `flat`, the world's sum of step_vector
        (identical on every rank). A layer that routed nothing in the step (a forward-only step) keeps its bias."""
        from models.moe.router import updated_expert_bias

        counts = flat[:self.num_layers * self.num_experts].view(self.num_layers, self.num_experts)
        for r in self.biased:
            if r.layer_number is not None and r.weight.requires_grad and bool(counts[r.layer_number - 1].any()):
                with torch.no_grad():
                    r.expert_bias.copy_(updated_expert_bias(r.expert_bias, counts[r.layer_number - 1], rate))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
