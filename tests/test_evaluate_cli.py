"""``python -m fpkern.evaluate``: bits/dim in the data range the checkpoint's model was
trained on, against closed forms; every option checked before the data are loaded or an ODE
solved; a user mistake exits 2 with one line naming the option or file.

The closed forms: with every weight 0 the networks output 0, so the score is 0. Under VE the
probability-flow ODE then stands still (f = 0): log p(x) = log N(x; 0, sigma_max^2 I). Under
VP, dx/dt = -beta(t) x / 2 and the divergence is -D beta(t) / 2, so x_eps maps to
x e^{-B/2} with B = int_eps^T beta and log p(x) = log N(x; 0, e^B I). Bits/dim of 8-bit data
dequantised to [lo, hi] are -log p / (D ln 2) + 8 - log2(hi - lo) (the density moved back to
the 0..256 grid).
"""

from __future__ import annotations

import math

import pytest
import torch

from fpkern.data.images import load_digits
from tests.test_sample_cli import (docstring_commands, error_line, score_sde_checkpoint,
                                   train_checkpoint)

PROG = "python -m fpkern.evaluate"
N, SEED = 3, 11


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_ckpts")
    ve, _ = train_checkpoint(root / "ve", arch="ncsnpp", zero=True)
    mlp, _ = train_checkpoint(root / "mlp", arch="mlp", dataset="8gaussians", mlp_width=16,
                              mlp_depth=2)
    vp, _ = score_sde_checkpoint(root / "score_sde_vp.pth", "small/ddpmpp", zero=True)
    return {"ve": ve, "mlp": mlp, "score_sde_vp": vp}


def _main(argv):
    from fpkern.evaluate import main

    return main([str(a) for a in argv])


def _bpd_line(capsys) -> float:
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "bits/dim" in ln][-1]
    return float(line.split(":")[1].split()[0])


def _dequantised(lo: float, hi: float) -> torch.Tensor:
    """The first N digits as the command dequantises them: (k + u) / 256, u the first
    N * 256 uniforms of a generator seeded SEED, then scaled to [lo, hi]; float64."""
    k = load_digits().images[:N].double()
    u = torch.rand(k.shape, generator=torch.Generator().manual_seed(SEED)).double()
    return lo + (hi - lo) * (k + u) / 256


def _gauss_bpd(x: torch.Tensor, var: float, lo: float, hi: float) -> float:
    """Mean bits/dim of x under N(0, var I), for 8-bit data dequantised to [lo, hi]."""
    D = x[0].numel()
    logp = -0.5 * D * math.log(2 * math.pi * var) - x.flatten(1).pow(2).sum(1) / (2 * var)
    return float((-logp / (D * math.log(2)) + 8 - math.log2(hi - lo)).mean())


_RUN = ["--dataset", "digits", "--split", "train", "--limit", N, "--batch-size", N,
        "--seed", SEED]


def test_bpd_of_a_ve_model_on_0_1_data(ckpts, capsys):
    """small/ncsnpp trains on [0, 1] (data.centered False): the command must evaluate there,
    with the 8-bit offset 8."""
    assert _main(["--checkpoint", ckpts["ve"], *_RUN]) == 0
    got = _bpd_line(capsys)
    want = _gauss_bpd(_dequantised(0.0, 1.0), 16.0 ** 2, 0.0, 1.0)    # sigma_max = 16
    wrong = _gauss_bpd(_dequantised(-1.0, 1.0), 16.0 ** 2, -1.0, 1.0)
    print(f"bpd {got}, closed form {want}, on [-1, 1] {wrong}")
    assert abs(want - wrong) > 0.5
    assert abs(got - want) < 1e-3


def test_bpd_of_a_score_sde_vp_checkpoint_on_centered_data(ckpts, capsys):
    """small/ddpmpp (VP) trains on centered data: [-1, 1], offset 7, taken from --config."""
    eps = 1e-5
    assert _main(["--checkpoint", ckpts["score_sde_vp"], "--config", "small/ddpmpp",
                  "--eps", eps, "--rtol", "1e-4", "--atol", "1e-4", *_RUN]) == 0
    got = _bpd_line(capsys)
    b0, b1 = 0.1, 20.0
    B = b0 * (1 - eps) + (b1 - b0) * (1 - eps ** 2) / 2
    want = _gauss_bpd(_dequantised(-1.0, 1.0), math.exp(B), -1.0, 1.0)
    wrong = _gauss_bpd(_dequantised(0.0, 1.0), math.exp(B), 0.0, 1.0)
    print(f"bpd {got}, closed form {want}, on [0, 1] {wrong}")
    assert abs(want - wrong) > 0.5
    assert abs(got - want) < 2e-3


def test_data_range_option_overrides_the_checkpoint(ckpts, capsys):
    assert _main(["--checkpoint", ckpts["ve"], "--data-range", "-1", "1", *_RUN]) == 0
    got = _bpd_line(capsys)
    assert abs(got - _gauss_bpd(_dequantised(-1.0, 1.0), 16.0 ** 2, -1.0, 1.0)) < 1e-3


# ---- every option, before any work ---------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Evaluating fails the test: the errors must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("evaluated before checking the options")

    monkeypatch.setattr("fpkern.evaluate.evaluate_bpd", refuse)


@pytest.mark.parametrize("argv,option", [
    (["--limit", "0"], "--limit"),
    (["--limit", "-2"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--probes", "0"], "--probes"),
    (["--probes", "two"], "--probes"),
    (["--rtol", "0"], "--rtol"),
    (["--atol", "inf"], "--atol"),
    (["--eps", "0"], "--eps"),
    (["--eps", "1"], "--eps"),
    (["--data-range", "1", "1"], "--data-range"),
    (["--device", "nonsense"], "--device"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "--device"),
    (["--config", "small/vp_digits"], "--config"),
    (["--seed", str(2 ** 64)], "--seed"),
    (["--split", "test"], "--dataset digits --split test"),
    (["--dataset", "mnist"], "--dataset mnist"),
    (["--dataset", "mnist", "--data-dir", "no/such/folder"], "--data-dir"),
])
def test_bad_options_exit_2_naming_the_option(ckpts, capsys, no_work, argv, option):
    base = ["--dataset", "digits", "--split", "train"]
    assert _main(["--checkpoint", ckpts["ve"], *base, *argv]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: {option}"), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check")
def test_cuda_on_a_cpu_build(ckpts, capsys, no_work):
    assert _main(["--checkpoint", ckpts["ve"], "--dataset", "digits", "--split", "train",
                  "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in error_line(capsys)


def test_exact_probes_beyond_the_jacobian_limit(ckpts, capsys, no_work, monkeypatch):
    monkeypatch.setattr("fpkern.ops.exact.MAX_DIM", 100)   # the model's D is 256
    assert _main(["--checkpoint", ckpts["ve"], "--dataset", "digits", "--split", "train",
                  "--probes", "exact"]) == 2
    assert error_line(capsys).startswith(f"{PROG}: error: --probes exact")


def test_a_2d_model_on_images(ckpts, capsys, no_work):
    assert _main(["--checkpoint", ckpts["mlp"], "--dataset", "digits", "--split", "train"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: --dataset digits") and "[2]" in line, line
    assert "channels must be" not in line


def test_a_corrupt_data_file_is_named(ckpts, tmp_path, capsys, no_work):
    bad = tmp_path / "train.npz"
    bad.write_bytes(b"not a zip archive")
    assert _main(["--checkpoint", ckpts["ve"], "--dataset", "npz", "--data-dir", bad,
                  "--split", "train"]) == 2
    assert str(bad) in error_line(capsys)


@pytest.mark.parametrize("content,needle", [(b"hello\n", "not a readable checkpoint"),
                                            (None, "no such file")])
def test_bad_checkpoint_exits_2_naming_it(tmp_path, capsys, no_work, content, needle):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    assert _main(["--checkpoint", path, "--dataset", "digits", "--split", "train"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: --checkpoint {path}") and needle in line, line


def test_docstring_examples_name_real_presets_and_splits():
    import fpkern.evaluate as mod
    from fpkern.models import PRESETS

    commands = docstring_commands(mod.__doc__, PROG)
    assert len(commands) >= 2
    for argv in commands:
        args = mod._parser().parse_args(argv)
        assert args.config is None or args.config in PRESETS, args.config
        assert args.dataset != "digits" or args.split == "train"   # digits has no test split


def test_evaluate_bpd_is_the_same_with_a_device_argument():
    from fpkern.data.mixture import GaussianMixture
    from fpkern.evaluate import evaluate_bpd
    from fpkern.sde import VPSDE

    gauss = GaussianMixture([1.0], torch.zeros(1, 12, dtype=torch.float64), [0.5])
    sde = VPSDE()
    images = torch.randint(0, 256, (3, 3, 2, 2), generator=torch.Generator().manual_seed(2),
                           dtype=torch.uint8)
    kw = dict(batch_size=2, rtol=1e-4, atol=1e-4, dtype=torch.float64, progress=False)
    a = evaluate_bpd(gauss.score_fn(sde), sde, images, **kw)
    b = evaluate_bpd(gauss.score_fn(sde), sde, images, device="cpu", **kw)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no image"):
        evaluate_bpd(gauss.score_fn(sde), sde, images[:0], **kw)


# ---- --likelihood density (docs/MATH.md 11) ------------------------------------------------
def test_density_bpd_of_a_ve_model_on_0_1_data(ckpts, capsys):
    """With the score 0 under VE every draw's integrand has mean 0, so the formula's mean is
    its terminal term, E log N(x + sqrt(nu_T) z; 0, sigma_max^2 I): the ODE's closed form plus
    nu_T / (2 sigma_max^2 ln 2) bits/dim, nu_T = sigma_max^2 - sigma(eps)^2 (the zero score's
    reverse SDE adds noise where its ODE stands still: MATH.md 11.5). The command's number
    is the library's on the same draws (data in [0, 1], one generator seeded --seed for the
    dequantisation and then the formula), and that is the closed form within 4 standard
    errors: far from the data's score the draws are noisy."""
    from fpkern.likelihood import density_log_likelihood, dequantize_to_range, nll_to_bpd
    from fpkern.sample import load_score_model

    assert _main(["--checkpoint", ckpts["ve"], *_RUN, "--likelihood", "density", "--nodes", 4,
                  "--mc-samples", 4]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "bits/dim" in ln][-1]
    got = float(line.split(":")[1].split()[0])
    assert "density formula, 32 network evaluations per image" in line, line
    model = load_score_model(ckpts["ve"])
    gen = torch.Generator().manual_seed(SEED)
    x = dequantize_to_range(load_digits().images[:N], data_range=(0.0, 1.0), generator=gen)
    res = density_log_likelihood(model.score_fn, model.sde, x, nodes=4, samples=4,
                                 generator=gen)
    D = x[0].numel()
    lib = nll_to_bpd(res.logp.double(), D, (0.0, 1.0)).mean().item()
    se = res.stderr.double().pow(2).sum().sqrt().item() / N / (D * math.log(2))
    ode = _gauss_bpd(_dequantised(0.0, 1.0), 16.0 ** 2, 0.0, 1.0)
    want = ode + 1 / (2 * math.log(2))      # sigma(eps)^2 / sigma_max^2 < 1e-6: left out
    print(f"bpd {got}, library {lib} +- {se}, closed form {want}, the ODE's {ode}")
    assert abs(got - lib) < 1e-4
    assert abs(lib - want) < 4 * se


def test_density_options_leave_the_ode_alone(ckpts, capsys):
    """--likelihood ode (the default, test_bpd_of_a_ve_model_on_0_1_data) ignores the
    density options: the closed form as there."""
    assert _main(["--checkpoint", ckpts["ve"], *_RUN, "--likelihood", "ode", "--nodes", 3,
                  "--quadrature", "midpoint", "--mc-samples", 2]) == 0
    got = _bpd_line(capsys)
    assert abs(got - _gauss_bpd(_dequantised(0.0, 1.0), 16.0 ** 2, 0.0, 1.0)) < 1e-3


@pytest.mark.parametrize("argv,option", [
    (["--nodes", "0"], "--nodes"),
    (["--mc-samples", "1"], "--mc-samples"),
    (["--ref-var", "0"], "--ref-var"),
    (["--ref-var", "nan"], "--ref-var"),
    (["--ref-var", "wide"], "--ref-var"),
    (["--quadrature", "trapezoid"], "argument --quadrature"),
    (["--quadrature-variable", "snr"], "argument --quadrature-variable"),
    (["--likelihood", "elbo"], "argument --likelihood"),
    (["--ref-var", "none"], "--quadrature stratified needs"),
    (["--no-antithetic"], "--quadrature stratified needs"),
])
def test_bad_density_options_exit_2_naming_the_option(ckpts, capsys, no_work, argv, option):
    base = ["--dataset", "digits", "--split", "train", "--likelihood", "density"]
    assert _main(["--checkpoint", ckpts["ve"], *base, *argv]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: {option}"), line


def test_exact_probes_limit_is_the_ode_s_only(ckpts, monkeypatch, no_work):
    """--probes exact beyond the Jacobian limit is refused for the ODE only: with --likelihood
    density the command goes on to evaluate (the no_work guard then stops it)."""
    monkeypatch.setattr("fpkern.ops.exact.MAX_DIM", 100)
    with pytest.raises(AssertionError, match="evaluated before"):
        _main(["--checkpoint", ckpts["ve"], "--dataset", "digits", "--split", "train",
               "--probes", "exact", "--likelihood", "density"])


def test_evaluate_bpd_density_on_a_gaussian():
    """The library path: evaluate_bpd(likelihood="density") on a Gaussian score gives the
    closed-form bpd within the formula's noise; an unknown likelihood is refused."""
    from fpkern.data.mixture import GaussianMixture
    from fpkern.evaluate import evaluate_bpd
    from fpkern.likelihood import dequantize_to_range
    from fpkern.sde import VPSDE

    D = 12
    gauss = GaussianMixture([1.0], torch.zeros(1, D, dtype=torch.float64), [0.5])
    sde = VPSDE()
    images = torch.randint(0, 256, (4, 3, 2, 2), generator=torch.Generator().manual_seed(2),
                           dtype=torch.uint8)
    bpd = evaluate_bpd(gauss.score_fn(sde), sde, images, batch_size=4, likelihood="density",
                       nodes=8, samples=64, dtype=torch.float64, progress=False)
    xq = dequantize_to_range(images, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    t = torch.full((4,), 1e-5, dtype=torch.float64)
    want = -gauss.log_prob(xq, t, sde) / (D * math.log(2)) + 7
    print(f"bpd {bpd.tolist()} closed form {want.tolist()}")
    assert (bpd - want).abs().max().item() < 0.15
    assert abs((bpd - want).mean().item()) < 0.05
    with pytest.raises(ValueError, match="likelihood"):
        evaluate_bpd(gauss.score_fn(sde), sde, images, likelihood="elbo", progress=False)
