"""The vision tower (models/vision): VisionModel against the per-frame reference (naive.py), the
variable-length batching, positions, frozen / recompute modes and input validation.

Tolerance: relative RMSE 1e-12 in float64 between vit.py and naive.py. The two compute the same math
in different orders (grouped SDPA vs explicit softmax, Linear vs Conv2d patch embedding, rotate-half
vs per-pair RoPE), so they differ by a few hundred float64 roundings (eps 2.2e-16); a wrong position,
token order or rotation gives errors of order 1e-2 and more. Varlen-vs-per-frame uses the same
1e-12 (different SDPA batch shapes may block the GEMMs differently); recompute is required bit-exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.video.packing import patchify
from models.vision import VisionConfig, VisionModel, frame_flops, so400m, tiny
from models.vision.naive import _frame_image, naive_forward
from models.vision.vit import interpolate_pos_embed, merge_order_index

TOL = 1e-12
LM = 24


def _rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    assert ref.shape == got.shape, (ref.shape, got.shape)
    ref, got = ref.detach().double(), got.detach().double()
    return float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def _model(recompute: bool = False, seed: int = 42) -> VisionModel:
    torch.manual_seed(seed)
    m = VisionModel(tiny(LM), recompute=recompute).double()
    with torch.no_grad():
        for p in m.parameters():          # off the default init: LayerNorm 1/0 and zero biases hide bugs
            p.add_(0.1 * torch.randn_like(p))
    return m


def _pixels(grid: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor([[1, r, c] for r, c in grid], dtype=torch.long)
    P = int(grid_thw.prod(-1).sum())
    return torch.randint(0, 256, (P, 3 * 14 * 14), generator=g, dtype=torch.uint8), grid_thw


# 28x28, 56x84, 84x56 px and the native 84x84 (= pos_grid 6 of the tiny preset), interleaved sizes
SIZES = [(2, 2), (4, 6), (6, 4), (2, 2), (6, 6), (4, 6)]


def test_forward_matches_naive():
    m = _model()
    pv, grid = _pixels(SIZES)
    out = m(pv, grid)
    ref = naive_forward(m, pv, grid)
    assert out.shape == (pv.shape[0] // 4, LM)
    assert _rel(ref, out) <= TOL


def test_forward_matches_naive_float_input():
    """Floating pixel values are taken as already normalised (both paths)."""
    m = _model()
    _, grid = _pixels([(4, 6), (2, 2)])
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 14 * 14, dtype=torch.float64)
    assert _rel(naive_forward(m, pv, grid), m(pv, grid)) <= TOL


def test_uint8_equals_normalised_float():
    m = _model()
    pv, grid = _pixels([(4, 6), (2, 2)])
    assert _rel(m(pv, grid), m((pv.double() / 255 - 0.5) / 0.5, grid)) <= TOL


def test_varlen_equals_per_frame_calls():
    m = _model()
    pv, grid = _pixels(SIZES)
    out = m(pv, grid)
    per, off = [], 0
    for t, r, c in grid.tolist():
        n = r * c
        per.append(m(pv[off:off + n], grid[len(per):len(per) + 1]))
        off += n
    assert _rel(torch.cat(per), out) <= TOL


def test_varlen_grad_equals_per_frame_grads():
    m1, m2 = _model(), _model()
    pv, grid = _pixels(SIZES)
    m1(pv, grid).pow(2).sum().backward()
    off = 0
    for i, (t, r, c) in enumerate(grid.tolist()):
        m2(pv[off:off + r * c], grid[i:i + 1]).pow(2).sum().backward()
        off += r * c
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert _rel(q.grad, p.grad) <= TOL, n


def test_patch_order_is_patchify_merge_order():
    """naive.py's inverse of the merge-group order recovers the frame that patchify flattened."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, 56, 84, 3), dtype=np.uint8)
    pv = torch.from_numpy(patchify(frame, 14, 2))
    cfg = tiny(LM)
    cfg.pixel_mean, cfg.pixel_std = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)   # identity normalisation
    img = _frame_image(pv, 4, 6, cfg, torch.float64)
    assert torch.equal(img, torch.from_numpy(frame[0]).permute(2, 0, 1).double())
    # and merge_order_index agrees: slot k holds the patch at row-major index idx[k]
    idx = merge_order_index(4, 6, 2)
    rows, cols = idx // 6, idx % 6
    for k in (0, 1, 2, 3, 4, 9, 23):
        r, c = int(rows[k]), int(cols[k])
        patch = frame[0, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].transpose(2, 0, 1).reshape(-1)
        assert np.array_equal(pv[k].numpy(), patch), k


def test_patch_embed_is_conv2d():
    m = _model()
    cfg = m.cfg
    conv = torch.nn.Conv2d(3, cfg.hidden, 14, stride=14).double()
    with torch.no_grad():
        conv.weight.copy_(m.vit.patch_embed.weight.view(cfg.hidden, 3, 14, 14))
        conv.bias.copy_(m.vit.patch_embed.bias)
    img = torch.randn(1, 3, 28, 42, dtype=torch.float64)
    ref = conv(img)[0].reshape(cfg.hidden, -1).t()                                # row-major patches
    patches = img[0].reshape(3, 2, 14, 3, 14).permute(1, 3, 0, 2, 4).reshape(6, -1)  # row-major, (C, ph, pw)
    assert _rel(ref, m.vit.patch_embed(patches)) <= TOL


def test_vit_is_transformers_siglip_with_its_2d_rope_turned_off(monkeypatch):
    """SigLIP's published architecture, as transformers' SiglipVisionModel runs it (Conv2d patches, learned positions,
    pre-LN blocks with separate q/k/v, tanh-GELU MLP, post LayerNorm), with the weights copied into ours: at the
    position table's own grid (no resize: transformers resizes bicubic, Keye's tower bilinear) and with our 2D RoPE
    made the identity (cos 1, sin 0; Keye adds it to SigLIP, checked in test_hf_keye_vision.py), the two give the same
    last hidden state, ours in merge-group order. Tolerance: TOL, float64 (the same math in another order)."""
    transformers = pytest.importorskip("transformers")
    import models.vision.vit as vit

    cfg = tiny(LM)
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.mlp, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads, image_size=cfg.pos_grid * cfg.patch, patch_size=cfg.patch,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False)).double().eval()
    with torch.no_grad():
        for p in hf.parameters():          # off the default init: LayerNorm 1/0 and zero biases hide bugs
            p.normal_(std=0.1)
    e = hf.embeddings
    sd = {"patch_embed.weight": e.patch_embedding.weight.reshape(cfg.hidden, -1),
          "patch_embed.bias": e.patch_embedding.bias, "pos_embed": e.position_embedding.weight,
          "post_norm.weight": hf.post_layernorm.weight, "post_norm.bias": hf.post_layernorm.bias}
    for i, layer in enumerate(hf.encoder.layers):
        a, b = layer.self_attn, f"blocks.{i}."
        sd.update({b + "norm1.weight": layer.layer_norm1.weight, b + "norm1.bias": layer.layer_norm1.bias,
                   b + "norm2.weight": layer.layer_norm2.weight, b + "norm2.bias": layer.layer_norm2.bias,
                   b + "attn.qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                   b + "attn.qkv.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                   b + "attn.proj.weight": a.out_proj.weight, b + "attn.proj.bias": a.out_proj.bias,
                   b + "mlp.fc1.weight": layer.mlp.fc1.weight, b + "mlp.fc1.bias": layer.mlp.fc1.bias,
                   b + "mlp.fc2.weight": layer.mlp.fc2.weight, b + "mlp.fc2.bias": layer.mlp.fc2.bias})
    m = VisionModel(cfg).double()
    m.vit.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    G, p, M = cfg.pos_grid, cfg.patch, cfg.merge
    img = torch.randn(2, 3, G * p, G * p, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(pixel_values=img).last_hidden_state[:, merge_order_index(G, G, M)]     # [2, G*G, h]
    # [2, C, G/M, M, p, G/M, M, p] -> (frame, merge row, merge col, row in group, col in group, C, ph, pw)
    pv = img.view(2, 3, G // M, M, p, G // M, M, p).permute(0, 2, 5, 3, 6, 1, 4, 7).reshape(-1, 3 * p * p)
    monkeypatch.setattr(vit, "rope_2d", lambda rows, cols, d, theta, dtype: (
        torch.ones(rows.numel(), d, dtype=dtype), torch.zeros(rows.numel(), d, dtype=dtype)))
    got = m.vit(pv, torch.tensor([[1, G, G]] * 2)).view(2, G * G, -1)
    assert _rel(ref, got) <= TOL


def test_position_interpolation_at_native_grid_is_the_table():
    table = torch.randn(36, 8, dtype=torch.float64)
    assert interpolate_pos_embed(table, 6, 6, 6) is table
    # bilinear resampling with align_corners=False onto the same grid is exactly the identity
    img = table.t().reshape(1, 8, 6, 6)
    same = F.interpolate(img, size=(6, 6), mode="bilinear", align_corners=False).reshape(8, 36).t()
    assert torch.equal(same, table)
    other = interpolate_pos_embed(table, 6, 4, 8)
    assert other.shape == (32, 8)


def test_frozen_stores_no_graph():
    m = _model()
    m.requires_grad_(False)
    pv, grid = _pixels([(4, 6)])
    out = m(pv, grid)
    assert out.grad_fn is None and not out.requires_grad
    m.projector.requires_grad_(True)                  # frozen ViT, trainable projector
    vit_out = m.vit(pv, grid)
    assert vit_out.grad_fn is None
    out = m(pv, grid)
    assert out.requires_grad
    out.sum().backward()
    assert all(p.grad is None for p in m.vit.parameters())
    assert all(p.grad is not None for p in m.projector.parameters())


def test_recompute_gives_identical_grads():
    a, b = _model(recompute=False), _model(recompute=True)
    pv, grid = _pixels(SIZES)
    w = torch.randn(pv.shape[0] // 4, LM, dtype=torch.float64)
    oa, ob = a(pv, grid), b(pv, grid)
    assert torch.equal(oa, ob)
    (oa * w).sum().backward()
    (ob * w).sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_empty_input():
    m = _model()
    out = m(torch.zeros(0, 588, dtype=torch.uint8), torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, LM)


@pytest.mark.parametrize("grid,pixels,match", [
    ([[1, 4, 6]], 23, r"pixel_values has 23 patches but grid_thw describes 24"),
    ([[1, 4, 6], [1, 3, 4]], 36, r"grid_thw\[1\] = \(1, 3, 4\).*multiples of merge \(2\)"),
    ([[2, 4, 6]], 48, r"grid_thw\[0\].*t must be 1"),
])
def test_bad_inputs_raise(grid, pixels, match):
    m = _model()
    with pytest.raises(ValueError, match=match):
        m(torch.zeros(pixels, 588, dtype=torch.uint8), torch.tensor(grid))


def test_bad_shapes_raise():
    m = _model()
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[patches, 588\]"):
        m(torch.zeros(24, 587, dtype=torch.uint8), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match=r"grid_thw must have shape \[frames, 3\]"):
        m(torch.zeros(24, 588, dtype=torch.uint8), torch.tensor([4, 6]))
    with pytest.raises(ValueError, match=r"grid_thw must be an integer tensor"):
        m(torch.zeros(24, 588, dtype=torch.uint8), torch.tensor([[1.0, 4.0, 6.0]]))


def test_config_validation():
    with pytest.raises(ValueError, match=r"hidden \(100\) must be divisible by vision.heads \(16\)"):
        VisionConfig(depth=1, hidden=100, heads=16, mlp=8, lm_hidden=8)
    with pytest.raises(ValueError, match=r"head_dim .* = 6 must be divisible by 4"):
        VisionConfig(depth=1, hidden=24, heads=4, mlp=8, lm_hidden=8)
    with pytest.raises(ValueError, match=r"pixel_mean"):
        VisionConfig(depth=1, hidden=16, heads=1, mlp=8, lm_hidden=8, pixel_mean=(0.5,))
    with pytest.raises(ValueError, match=r"vision.depth must be >= 1"):
        VisionConfig(depth=0, hidden=16, heads=1, mlp=8, lm_hidden=8)


def test_presets_and_param_count():
    cfg = so400m(2048)
    assert (cfg.depth, cfg.hidden, cfg.heads, cfg.mlp, cfg.patch, cfg.pos_grid) == (27, 1152, 16, 4304, 14, 27)
    # SigLIP-so400m vision tower (without its pooling head) has ~412.4M parameters
    vit_only = cfg.num_params() - (2 * 1152 + 4608 * 4608 + 4608 + 4608 * 2048 + 2048)
    assert 411e6 < vit_only < 414e6, vit_only
    m = VisionModel(tiny(LM))
    assert m.cfg.num_params() == sum(p.numel() for p in m.parameters())


def test_frame_cost_is_quadratic_aware():
    cfg = tiny(LM)
    m = VisionModel(cfg)
    cost = m.frame_cost(torch.tensor([[1, 4, 4], [1, 8, 8]]))
    assert cost.dtype == torch.float64
    assert float(cost[0]) == frame_flops(cfg, 4, 4)
    assert float(cost[1]) > 4 * float(cost[0])      # 4x the patches costs more than 4x (attention ~ n^2)
    n, h = 16, cfg.hidden
    expect = (2 * n * cfg.patch_dim * h + cfg.depth * (2 * n * (4 * h * h + 2 * h * cfg.mlp) + 4 * n * n * h)
              + 2 * (n // 4) * ((4 * h) ** 2 + 4 * h * LM))
    assert float(cost[0]) == expect


def test_step_flops_count_the_vit_in_the_throughput():
    """The trainer adds these to the LM's FLOPs (train/metrics.py): 3x forward when the ViT trains,
    1x when it is frozen; the Meter's TFLOP/s include them."""
    from train.metrics import Meter, StepStats
    from train.vision import vision_step_flops

    cfg = tiny(LM)
    m = VisionModel(cfg)
    mbs = [{"grid_thw": torch.tensor([[1, 4, 4], [1, 8, 8]])}, {"grid_thw": torch.tensor([[1, 4, 4]])}]
    fwd = 2 * frame_flops(cfg, 4, 4) + frame_flops(cfg, 8, 8)
    assert vision_step_flops(m, mbs) == 3 * fwd
    for p in m.vit.parameters():
        p.requires_grad_(False)
    assert vision_step_flops(m, mbs) == fwd
    meter = Meter(flops_per_token=1e6, world_size=2, peak_tflops=None, total_steps=1)
    s = StepStats(step=1, loss=0.0, grad_norm=0.0, lr=0.0, seconds=2.0, tokens=1000, flops=4e12)
    assert meter.rates(s)["tflops_per_device"] == pytest.approx((1e9 + 4e12) / 2.0 / 2 / 1e12)


def test_the_towers_clip_scales_down_only_past_its_bound_and_zero_turns_it_off():
    """train/vision.clip_grads against the norm computed here: gradients past train.grad_clip are scaled to it (as
    torch's clip_grad_norm_), under it left alone, and with grad_clip 0 (no clipping, as megatron's optimizer reads
    it for the LM) left alone too, not zeroed. The norm before clipping is returned each time."""
    from train.vision import clip_grads

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    norm = float(torch.cat([x.flatten() for x in grads]).double().norm())   # about 4.6
    for clip, scale in ((1.0, 1.0 / norm), (100.0, 1.0), (0.0, 1.0)):
        params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
        for p, x in zip(params, grads):
            p.grad = x.clone()
        assert clip_grads(params, clip) == pytest.approx(norm, rel=1e-6)   # fp32 sums of 22 squares
        for p, x in zip(params, grads):
            torch.testing.assert_close(p.grad, x * scale, rtol=1e-5, atol=0)   # torch's 1e-6 in the divisor


def test_the_vision_optimizer_decays_weight_matrices_and_not_norms_or_biases():
    """train.weight_decay on the vision tower as megatron-core's optimizer applies it to the language model: the
    weight matrices (and the learned position table) decay, biases and the LayerNorms' weights do not. With zero
    gradients AdamW's update is exactly its decoupled decay, w <- w * (1 - lr * wd), and nothing for the others.
    Tolerance: one fp32 multiply (relative 1e-7)."""
    from train.config import TrainConfig
    from train.vision import build_vision_optimizer

    torch.manual_seed(0)
    m = VisionModel(tiny(LM))
    with torch.no_grad():   # LayerNorm weights start at 1, biases at 0: make every value one decay would move
        for p in m.parameters():
            p.add_(torch.rand_like(p) + 0.5)
    t = TrainConfig(lr=1e-2, min_lr=0.0, weight_decay=0.5)
    opt = build_vision_optimizer(m, t)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    norms_and_biases = [n for n, p in m.named_parameters() if n.endswith(".bias") or ".norm" in n or "_norm" in n]
    assert any("norm" in n and n.endswith(".weight") for n in norms_and_biases)
    for n, p in m.named_parameters():
        if n in norms_and_biases:
            assert torch.equal(p, before[n]), f"{n} decayed"
        else:
            assert p.dim() >= 2, n
            torch.testing.assert_close(p, before[n] * (1 - t.lr * t.weight_decay), rtol=1e-7, atol=0, msg=n)


def test_a_frozen_vit_stays_bit_identical_and_holds_no_optimizer_state():
    """The projector alignment stage (train.trainable=projector) through the trainer's VisionTower in one process:
    three steps of forward, backward, reduction and AdamW update leave every ViT tensor bit-identical to its copy
    taken before them, move every projector tensor, and the optimizer (and the checkpoint's vision_optimizer.*
    entries) hold the projector's parameters alone."""
    from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron
    from tests.unit.test_config import _validate
    from train.vision import VisionTower

    pgs = init_one_process_megatron(3)
    try:
        cfg, layout = _validate("recipe=keye_tiny", "parallel=single", "train.trainable=projector", world_size=1)
        tower = VisionTower(cfg, layout, pgs, torch.device("cpu"), train_vit=False, train_projector=True, bf16=False)
        vit0 = {n: p.detach().clone() for n, p in tower.model.vit.named_parameters()}
        proj0 = {n: p.detach().clone() for n, p in tower.model.projector.named_parameters()}
        for step in range(3):
            pixels, grid = _pixels([(4, 6), (2, 2)], seed=step)
            mb = dict(pixel_values=pixels, grid_thw=grid, tokens=torch.zeros(1, 16, dtype=torch.long),
                      visual_pos=torch.arange(7))
            (e,) = tower.forward([mb], torch.device("cpu"))
            e.pow(2).sum().backward()
            tower.backward()
            tower.reduce_grads(10.0)
            tower.update(step)
        assert all(torch.equal(vit0[n], p) and p.grad is None for n, p in tower.model.vit.named_parameters())
        assert all(not torch.equal(proj0[n], p) for n, p in tower.model.projector.named_parameters())
        assert {id(p) for p in tower.optimizer.state} == {id(p) for p in tower.model.projector.parameters()}
        saved = {k.rsplit(".", 1)[0] for k in tower.sharded_state() if k.startswith("vision_optimizer.")}
        assert saved == {f"vision_optimizer.projector.{n}" for n, _ in tower.model.projector.named_parameters()}
    finally:
        destroy_one_process_megatron()
