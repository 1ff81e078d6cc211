"""The training step a user writes from the public API (DSM + fpe_terms at the DSM's points)
against FPLoss.with_dsm: the same numbers, the same parameter gradients, and the network
run the same number of times, on plain tensors and on Jets, forward and backward, in both
forms. The README's first example runs as written."""

import logging
import pathlib
import re

import pytest
import torch

from fpkern.jet import Jet
from fpkern.losses import DSMLoss, FPLoss
from fpkern.models import MLP, NCSNpp, ScoreFn
from fpkern.ops import fpe_residual, fpe_terms
from fpkern.sde import VESDE, VPSDE

ALPHA, BETA, K = 0.3, 0.2, 2
README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def mlp_case():
    torch.manual_seed(0)
    sde = VPSDE()
    net = ScoreFn(MLP(3, width=16, depth=2), sde).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return net, sde, x


def ncsnpp_case():
    torch.manual_seed(0)
    sde = VESDE(sigma_max=10.0)
    net = NCSNpp(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
                 num_channels=1, dropout=0.0, sigma_max=10.0)
    with torch.no_grad():                # off Score SDE's zero init: every branch contributes
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    net = ScoreFn(net, sde).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return net, sde, x


CASES = {"mlp": mlp_case, "ncsnpp": ncsnpp_case}


class Counted(torch.nn.Module):
    """The score function, recording each call as 'plain' or 'jet'."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x, t):
        self.calls.append("jet" if isinstance(x, Jet) else "plain")
        return self.net(x, t)


def user_step(score_fn, sde, x, form, g, *, dsm_first=False):
    """What the README shows: perturb, fpe_terms at x_t, the DSM term from its score (or,
    laplacian form, the DSM forward first and its s given to the pass)."""
    dsm = DSMLoss(sde)
    t, xt, z, std = dsm.perturb(x, generator=g)
    w = sde.g2(t) / x[0].numel() ** 2
    s = score_fn(xt, t) if dsm_first else None
    terms = fpe_terms(score_fn, xt, t, sde, form=form, weight=w, probes=K, generator=g, score=s)
    d = dsm.from_score(terms.score if s is None else s, t, xt, z, std)
    return d.loss.mean() + ALPHA * terms.loss.mean() + BETA * torch.linalg.vector_norm(terms.scalar)


def library_step(score_fn, sde, x, form, g):
    fp = FPLoss(sde, preset="paper", alpha=ALPHA, beta=BETA, probes=K, form=form)
    d, f = fp.with_dsm(DSMLoss(sde), score_fn, x, generator=g)
    return d.loss.mean() + f.loss


def run(step, case, form, **kw):
    """(loss, parameter gradients, calls in the forward, calls in the backward)."""
    net, sde, x = CASES[case]()
    counted = Counted(net)
    loss = step(counted, sde, x, form, torch.Generator().manual_seed(2), **kw)
    forward = list(counted.calls)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss, grads, forward, counted.calls[len(forward):]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("form,dsm_first", [("div", False), ("laplacian", False),
                                            ("laplacian", True)])
def test_user_composition_equals_with_dsm(case, form, dsm_first):
    loss, grads, fwd, bwd = run(user_step, case, form, dsm_first=dsm_first)
    want_loss, want_grads, want_fwd, want_bwd = run(library_step, case, form)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
    scale = max(b.abs().max().item() for b in want_grads)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * scale)
    assert (fwd, bwd) == (want_fwd, want_bwd)
    # div: one jet pass forward, one recomputed in the backward, no plain forward;
    # laplacian: the plain forward for the transport direction, then one jet pass
    assert (fwd, bwd) == ((["jet"], ["jet"]) if form == "div" else (["plain", "jet"], []))


def dsm_then_div_residual(score_fn, sde, x, form, g):
    """The composition that costs more: a DSM forward of its own, then the div residual."""
    dsm = DSMLoss(sde)
    t, xt, z, std = dsm.perturb(x, generator=g)
    s = score_fn(xt, t)
    r = fpe_residual(score_fn, xt, t, sde, form="div", method="fused", probes=K, generator=g,
                     score=s)
    w = sde.g2(t) / x[0].numel() ** 2
    vec = w * r.flatten(1).pow(2).sum(1)
    return dsm.from_score(s, t, xt, z, std).loss.mean() + ALPHA * vec.mean()


def test_a_dsm_forward_before_the_div_form_is_one_more_pass_and_says_so(caplog):
    """The div form computes s itself: a score given to it goes unused, the step runs a plain
    forward (and its backward) that fpe_terms(...).score saves, and the log says so once."""
    from fpkern.ops import residual as residual_module
    residual_module._warned.discard(residual_module._UNUSED_SCORE)
    with caplog.at_level(logging.WARNING, logger="fpkern.ops.residual"):
        _, _, fwd, bwd = run(dsm_then_div_residual, "mlp", "div")
        run(dsm_then_div_residual, "mlp", "div")
    assert (fwd, bwd) == (["plain", "jet"], ["jet"])
    hints = [r for r in caplog.records if "fpe_terms" in r.getMessage()]
    assert len(hints) == 1 and "does not use score=" in hints[0].getMessage()


def test_the_readme_first_example_runs():
    """The first python block of README.md, as written."""
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "fpe_terms" in block and "dsm.from_score(terms.score" in block
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["terms"].score.shape == scope["x"].shape
