"""Measures the bytes autograd saves for backward in one forward of the tiny dense LM (fp32, CPU, one
process), per layer type, for tests/unit/test_memory_estimator.py.

    python tests/unit/memory_measure_worker.py SEQ  -> prints one JSON line
    python tests/unit/memory_measure_worker.py SEQ RECIPE TRAINABLE  -> the same for a training stage

With RECIPE and TRAINABLE (e.g. keye_tiny_dsa_warmup indexer) the model is frozen as that stage freezes it
(models/lm.freeze_for_stage); for trainable=indexer its DSA layers back-propagate their KL in their forward,
as the warm-up's indexer-only step runs them (train.indexer_backward=local). The line then also holds
`trainable_elements` (parameters that require grad) and `alive_after_forward`: the bytes of saved tensors
still held once the forward has returned (what a later backward would need).

Every tensor handed to autograd's saved-tensor hooks is attributed to the module running at the time
(attention block incl. its input norm, MoE block incl. its norm, the rest) and counted once per storage;
parameters are excluded. This is the "kept for backward" memory parallel/memory.py predicts; transient
buffers are not visible here.
"""
import gc
import json
import os
import sys
import weakref
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()


def main(seq: int, recipe: str = "keye_tiny_lm", trainable: str = "all") -> None:
    import torch
    from models.init import init_layout_invariant
    from models.lm import build_lm, transformer_config
    from parallel.groups import build_process_groups, init_distributed, seed_all, teardown
    from parallel.layout import ParallelLayout
    from train.config import to_config
    from train.launch import compose_config

    init_distributed()
    cfg = to_config(compose_config([f"recipe={recipe}", "parallel=single", f"train.seq_length={seq}",
                                    "train.micro_batch_size=1", "train.global_batch_size=1"]))
    lm = cfg.model.lm
    layout = ParallelLayout.build(cfg.parallel, world_size=1, lm=lm)
    pgs = build_process_groups(layout)
    seed_all(1, pgs)
    model = build_lm(lm, transformer_config(lm, layout.model_sizes(), bf16=False, use_cpu_initialization=False),
                     pg_collection=pgs, pp_rank=0, pp_size=1)
    init_layout_invariant([model], seed=1, std=lm.init_std, num_layers=lm.num_layers)
    if trainable != "all":
        from models.attention.dsa import use_local_kl_backward
        from models.lm import freeze_for_stage
        freeze_for_stage([model], trainable)
        if trainable == "indexer":
            use_local_kl_backward([model])
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}
    saved = []  # weak references: what is still alive once the forward returns
    current = ["other"]

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen[st.data_ptr()] = (current[0], st.nbytes())
            saved.append((weakref.ref(t), st.nbytes()))
        return t

    tags = {"input_layernorm": "attention", "self_attention": "attention", "pre_mlp_layernorm": "moe", "mlp": "moe"}
    for name, mod in model.named_modules():
        tag = tags.get(name.split(".")[-1]) if ".layers." in name else None
        if tag:
            mod.register_forward_pre_hook(lambda m, a, tag=tag: current.__setitem__(0, tag))
            mod.register_forward_hook(lambda m, a, o: current.__setitem__(0, "other"))
    tok = torch.randint(0, lm.vocab_size, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tok, torch.arange(seq).expand(3, 1, seq), None, labels=tok)
    gc.collect()
    alive = sum(n for ref, n in saved if ref() is not None)
    per = Counter()
    for tag, n in seen.values():
        per[tag] += n
    print(json.dumps({"layers": lm.num_layers, **per, "alive_after_forward": alive,
                      "output_requires_grad": out.requires_grad,
                      "trainable_elements": sum(p.numel() for p in model.parameters() if p.requires_grad)}))
    teardown()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:4])
