"""The training loop's optimizer and EMA against written-out references."""

import pytest
import torch

from fpkern.models import MLP, from_preset
from fpkern.train.ema import EMA
from fpkern.train.optim import adam


def _adam_reference(p, g, m, v, step, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam update written out (Kingma & Ba, with torch's bias corrections)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** step)
    v_hat = v / (1 - b2 ** step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def test_adam_is_fused_on_cpu_and_matches_the_update_rule():
    torch.manual_seed(0)
    net = MLP(3, width=16, depth=2).double()
    params = list(net.parameters())
    opt = adam(params, lr=1e-3)
    assert opt.defaults["fused"] is True
    ref = [(p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step in range(1, 6):
        lr = 1e-3 * min(1.0, step / 3)           # a warm-up changes lr between steps
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = [_adam_reference(p0, g, m, v, step, lr) for (p0, m, v), g in zip(ref, grads)]
        for p, (want, _, _) in zip(params, ref):
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


def test_adam_falls_back_where_no_fused_kernel_runs():
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not adam(meta, lr=1e-3).defaults["fused"]


@pytest.mark.parametrize("decay, n", [(0.9999, 7), (0.5, 100)])   # warm-up, then decay
def test_ema_update_follows_score_sde_warmup(decay, n):
    torch.manual_seed(0)
    net = from_preset("small/ncsnpp").double()
    ema = EMA(net, decay)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        for b in net.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    ema.update(net, n)
    d = min(decay, (1 + n) / (10 + n))
    for pe, p0, p in zip(ema.module.parameters(), start, net.parameters()):
        torch.testing.assert_close(pe, d * p0 + (1 - d) * p.detach(), rtol=1e-12, atol=1e-14)
    buffers = list(zip(ema.module.buffers(), net.buffers()))
    assert buffers                                    # the FIR kernels
    for be, b in buffers:
        assert torch.equal(be, b)


def test_ema_decay_outside_unit_interval():
    with pytest.raises(ValueError, match="decay"):
        EMA(MLP(2, width=8, depth=1), 1.0)


def test_ema_update_equals_the_per_tensor_lerp_bit_for_bit():
    torch.manual_seed(1)
    net = MLP(5, width=32, depth=3)
    ema = EMA(net, 0.999)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    want = [pe.detach().clone().lerp_(p.detach(), 1 - min(0.999, 4 / 13))
            for pe, p in zip(ema.module.parameters(), net.parameters())]
    ema.update(net, 3)
    for pe, w in zip(ema.module.parameters(), want):
        assert torch.equal(pe, w)
