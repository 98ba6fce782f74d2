"""KSA distillation's attention term (train/distill.py AttentionMatch) on a packed row: the text positions of its
padding (document -1) are in no mean and get no gradient from it; the term is the plain mean over the others.
Tolerance 1e-6 relative: the same fp32 sums over 28 values in another order (rounding ~1e-7)."""
import torch

from tests.kernels.helpers import assert_close


def test_the_attention_term_leaves_a_packed_rows_padding_out():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from train.distill import AttentionMatch, masked_mse

    g = torch.Generator().manual_seed(0)
    s, h, real_n = 10, 4, 7                                   # 7 tokens of documents, then 3 of padding
    teacher, student = torch.randn(s, 1, h, generator=g), torch.randn(s, 1, h, generator=g)
    real = torch.zeros(1, s, dtype=torch.bool)
    real[:, :real_n] = True
    ref = (student[:real_n] - teacher[:real_n]).pow(2).mean()
    assert_close("masked mse", ref, masked_mse(student, teacher, real), 1e-6)
    assert masked_mse(student, teacher, None) == (student - teacher).pow(2).mean()
    assert masked_mse(student, teacher, torch.zeros_like(real)) == 0            # a row of padding alone

    # through the layer hook: the term attached to the student's output, its gradient into that output
    match = AttentionMatch([], tp_group=None, sequence_parallel=False)
    layer = torch.nn.Identity().train()
    with match.teacher():
        match._hook(layer, (), (teacher,))
    match.arm_student(torch.arange(s), weight_per_layer=torch.tensor(1.0), clamp=1e9, real=real)
    x = student.clone().requires_grad_()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))   # the term's gradient unscaled (conftest resets it)
    out = match._hook(layer, (), (x,))
    out[0].sum().mul(0).backward()                           # only the attached term's gradient reaches x
    assert_close("the term's value", ref, match.values[layer], 1e-6)
    want = torch.zeros_like(student)
    want[:real_n] = 2 * (student[:real_n] - teacher[:real_n]) / (real_n * h)
    assert_close("d term / d student output", want, x.grad, 1e-6)
    assert torch.equal(x.grad[real_n:], torch.zeros_like(x.grad[real_n:]))
