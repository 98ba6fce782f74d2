"""Logits of our model against the transformers implementation of the same Qwen3-MoE checkpoint.

Both run in fp32 on the same fixed token ids; positions 0..s-1 (our model takes them as the three equal
rows [3, b, s] of multimodal RoPE, which is plain RoPE). With tensor parallelism the vocabulary-parallel
logits are gathered over the TP group, so every rank ends with the full [b, s, V] logits.

Tolerance (fp32, CPU): the two implementations differ in summation order only (fused QKV GEMM against
three GEMMs, SDPA against transformers' attention, expert loop order, fp32 router in both), so logits
agree to a few ulp of their magnitude: `max|ours - ref| <= LOGIT_ATOL + LOGIT_RTOL * max|ref|`. A routing
flip (two experts' router scores within rounding of each other) would break that by orders of magnitude,
which a random tiny model at the fixed seed does not hit.
"""

from __future__ import annotations

import os

import torch

LOGIT_ATOL = 1e-5
LOGIT_RTOL = 1e-4


def fixed_input_ids(vocab_size: int, *, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def check_modeling_current(hf_dir: str | os.PathLike, config: dict | None = None) -> None:
    """ValueError unless a DSA or KSA model's directory carries this version's code for it and its auto_map (the code
    transformers runs as the reference); a dense model's directory passes. `config`: its config.json, if read."""
    from models.hf.qwen3_moe import modeling_is_current

    if not modeling_is_current(hf_dir, config):
        raise ValueError(f"{hf_dir}: config.json names DSA or KSA layers, but the directory lacks this version's code "
                         "for them or its auto_map (an older export?): `python launch/convert.py code "
                         f"{hf_dir}` writes it")


@torch.no_grad()
def reference_logits(hf_dir: str | os.PathLike, input_ids: torch.Tensor, *, dense: bool = False) -> torch.Tensor:
    """transformers on the checkpoint, fp32, eager attention: [b, s, V]. A DSA or KSA model's directory (config.json
    with `dsa_layers` or `ksa_layers`) runs through its own code (models/hf/modeling_qwen3_moe_{dsa,ksa}.py,
    trust_remote_code): the indexers select the keys, the summary tokens go in. `dense=True` reads a DSA directory
    as transformers' dense Qwen3MoeForCausalLM instead (the indexers unused)."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from models.hf.qwen3_moe import modeling_variant

    from models.hf.keye_vision import TRANSFORMERS, KeyeLMView, is_multimodal

    config = json.loads(Path(hf_dir, "config.json").read_text())
    own = modeling_variant(config) is not None and not dense  # the directory's own code
    if own:
        check_modeling_current(hf_dir, config)
    kwargs = {}
    if is_multimodal(config) and not own:
        # a Keye-VL directory: its language model as transformers' Qwen3-MoE (the vision tensors unused), the LM
        # config KeyeLMView lifts, and in the transformers layout its `model.language_model.` names read as `model.`
        # (without that mapping transformers left every LM weight at a random init, with a warning only)
        from transformers import Qwen3MoeConfig

        view = KeyeLMView(hf_dir)
        kwargs["config"] = Qwen3MoeConfig.from_dict(dict(view.config))
        if view.layout is TRANSFORMERS:
            kwargs["key_mapping"] = {"^" + TRANSFORMERS.lm.replace(".", r"\."): "model."}
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager",
                                                 trust_remote_code=own, **kwargs)
    model.eval()
    return model(input_ids=input_ids, use_cache=False).logits.float()


@torch.no_grad()
def model_logits(model, input_ids: torch.Tensor, *, tp_group) -> torch.Tensor:
    """Our model chunk (one pipeline stage holding the whole model) on `input_ids`: full-vocab [b, s, V]."""
    module = getattr(model, "module", model)
    if not (module.pre_process and module.post_process):
        raise ValueError("logit verification needs the whole model on one pipeline stage (parallel.pp=1)")
    device = next(module.parameters()).device
    ids = input_ids.to(device)
    b, s = ids.shape
    pos = torch.arange(s, device=device).expand(3, b, s)
    text_index = None
    if getattr(module, "num_summary", 0):  # KSA: the summary slots go in as in training (train/trainer.py)
        from models.attention.ksa import KSASelfAttention
        from models.ksa_tokens import insert_summary_slots

        chunk = next(m.chunk for m in module.modules() if isinstance(m, KSASelfAttention))
        sb = insert_summary_slots(ids, chunk=chunk, num_summary=module.num_summary, slot_ids_from=module.vocab_size)
        ids, text_index = sb.input_ids, sb.layout.text_index
        s = ids.shape[1]
        pos = sb.position_ids.expand(3, b, s)
    if s % tp_group.size():
        raise ValueError(f"sequence length {s} must be divisible by tp ({tp_group.size()}) (sequence parallel)")
    was_training = module.training
    module.eval()
    try:
        logits = module(ids, pos, None)  # [b, s, V / tp]
    finally:
        module.train(was_training)
    if tp_group.size() > 1:
        import torch.distributed as dist

        parts = [torch.empty_like(logits) for _ in range(tp_group.size())]
        dist.all_gather(parts, logits.contiguous(), group=tp_group)
        logits = torch.cat(parts, dim=-1)
    if text_index is not None:  # the text tokens' logits, aligned with input_ids
        logits = logits[:, text_index]
    return logits.float().cpu()


def compare_logits(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """Differences and the verdict against the stated tolerance."""
    if ours.shape != ref.shape:
        raise ValueError(f"logit shapes differ: ours {list(ours.shape)}, reference {list(ref.shape)}")
    diff = (ours - ref).abs()
    scale = ref.abs().max().item()
    bound = LOGIT_ATOL + LOGIT_RTOL * scale
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "max_abs_ref": scale,
            "tolerance": bound, "argmax_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "ok": bool(diff.max().item() <= bound)}
