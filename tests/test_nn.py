"""rfm_fast.nn: layer AGOPs (against autograd and against rfm_fast.agop), the per-layer collapse measures on
networks whose answers are known, the paper's MLP and the nn-collapse command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import rfm_fast
from rfm_fast import metrics
from rfm_fast.nn import (LinearLayer, collapse_by_layer, layer_agop, layers_of, paper_mlp, pearson,
                         pm_one_targets, psd_sqrt, right_singular_share, train_mlp)
from tests.tolerances import REL_FRO, rel_fro


def _tiny_mlp(d_in=5, hidden=7, d_out=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out)).to(dtype)


def _autograd_agop(fn, X):
    total = torch.zeros(X[0].numel(), X[0].numel(), dtype=torch.float64)
    for x in X:
        J = torch.autograd.functional.jacobian(lambda z: fn(z.unsqueeze(0)).squeeze(0), x)
        J = J.reshape(-1, x.numel()).to(torch.float64)
        total += J.T @ J
    return total


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
@pytest.mark.parametrize("batch_size", [1, 4, None])
def test_layer_agop_matches_autograd_loop(rng, mode, batch_size):
    model = _tiny_mlp()
    X = torch.randn(13, 5, generator=rng, dtype=torch.float64)
    ref = _autograd_agop(model, X)
    out = layer_agop(model, X, batch_size=batch_size, mode=mode)
    assert out.shape == (5, 5) and out.dtype == torch.float64
    assert rel_fro(out, ref) < REL_FRO[torch.float64]
    assert rel_fro(layer_agop(model, X, batch_size=batch_size, mode=mode, mean=True), ref / 13) < REL_FRO[
        torch.float64]
    assert torch.equal(out, out.T)


def test_layer_agop_float32_module_and_numpy_input(rng):
    model = _tiny_mlp(dtype=torch.float32)
    X = torch.randn(9, 5, generator=rng, dtype=torch.float64)
    out = layer_agop(model, X.numpy(), batch_size=2)
    assert out.dtype == torch.float32
    ref = _autograd_agop(model.double(), X)
    assert rel_fro(out, ref) < REL_FRO[torch.float32]


def test_layer_agop_flattens_multidimensional_inputs_and_outputs(rng):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Unflatten(1, (2, 2)))
    model = model.double()
    X = torch.randn(7, 2, 3, generator=rng, dtype=torch.float64)
    out = layer_agop(model, X, batch_size=3)
    assert out.shape == (6, 6)
    assert rel_fro(out, _autograd_agop(model, X)) < REL_FRO[torch.float64]


def test_layer_agop_of_linear_map_is_gram_matrix(rng):
    W = torch.randn(3, 6, generator=rng, dtype=torch.float64)
    X = torch.randn(11, 6, generator=rng, dtype=torch.float64)
    out = layer_agop(lambda z: z @ W.T, X, mean=True)
    assert rel_fro(out, W.T @ W) < REL_FRO[torch.float64]


def _kernel_predictor(centers, alpha, M, kernel, L):
    def f(z):
        diff = z[:, None, :] - centers[None, :, :]
        sq = torch.einsum("mnd,de,mne->mn", diff, M, diff)
        k = torch.exp(-sq.sqrt() / L) if kernel == "laplace" else torch.exp(-sq / (2 * L**2))
        return k @ alpha

    return f


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_layer_agop_matches_rfm_fast_agop_on_kernel_predictor(rng, kernel):
    n, m, d, c, L = 23, 17, 4, 3, 1.7
    centers = torch.randn(n, d, generator=rng, dtype=torch.float64)
    Z = torch.randn(m, d, generator=rng, dtype=torch.float64)
    alpha = torch.randn(n, c, generator=rng, dtype=torch.float64)
    A = torch.randn(d, d, generator=rng, dtype=torch.float64)
    M = A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    ref = rfm_fast.agop(Z, centers, alpha, kernel=kernel, bandwidth=L, M=M, backend="naive")
    out = layer_agop(_kernel_predictor(centers, alpha, M, kernel, L), Z, batch_size=5, mean=True)
    assert rel_fro(out, ref) < REL_FRO[torch.float64]


def test_layer_agop_rejects_bad_input():
    model = _tiny_mlp()
    with pytest.raises(ValueError, match="mode"):
        layer_agop(model, torch.randn(3, 5, dtype=torch.float64), mode="sideways")
    with pytest.raises(ValueError, match="batch_size"):
        layer_agop(model, torch.randn(3, 5, dtype=torch.float64), batch_size=0)
    with pytest.raises(ValueError, match="no samples"):
        layer_agop(model, torch.zeros(0, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        layer_agop(model, torch.ones(3, 5, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_agop_on_cuda_matches_cpu(rng):
    model = _tiny_mlp()
    X = torch.randn(50, 5, generator=rng, dtype=torch.float64)
    ref = layer_agop(model, X)
    out = layer_agop(model.cuda(), X, batch_size=7)
    assert out.device.type == "cuda"
    assert rel_fro(out, ref) < REL_FRO[torch.float64]


def test_right_singular_share_definition_and_degenerate_cases():
    assert right_singular_share(1.0, 0.5, 0.25) == pytest.approx(0.5)
    assert right_singular_share(1.0, 0.25, 0.25) == pytest.approx(1.0)
    assert right_singular_share(1.0, 0.1, 0.5) == pytest.approx(math.log(10) / math.log(2))
    assert right_singular_share(1.0, 2.0, 0.5) == pytest.approx(-1.0)
    assert math.isnan(right_singular_share(1.0, 0.5, 1.0))
    assert math.isnan(right_singular_share(1.0, 0.5, 2.0))
    assert math.isnan(right_singular_share(1.0, 0.0, 0.5))
    assert math.isnan(right_singular_share(float("inf"), 0.5, 0.25))


def test_pearson_and_psd_sqrt(rng):
    a = torch.randn(5, 5, generator=rng, dtype=torch.float64)
    assert pearson(a, 3 * a + 2) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert math.isnan(pearson(a, torch.ones(5, 5)))
    P = a @ a.T
    root = psd_sqrt(P)
    assert rel_fro(root @ root, P) < 1e-10 and torch.allclose(root, root.T)
    assert torch.all(torch.linalg.eigvalsh(psd_sqrt(-P)) == 0)


def _two_class_data(rng, n=40, d=6):
    y = torch.arange(n) % 2
    X = torch.randn(n, d, generator=rng, dtype=torch.float64) * 0.3
    X[:, 0] += 2.0 * y
    X[:, 1] += 1.0
    return X.abs(), y


def test_collapse_measures_match_their_definitions(rng):
    X, y = _two_class_data(rng)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 9, bias=False), nn.ReLU(), nn.Linear(9, 4, bias=False), nn.ReLU(),
                          nn.Linear(4, 2, bias=False)).double()
    results = collapse_by_layer(model, X, y)
    assert [r.name for r in results] == ["0", "2"]
    Phi = X
    for r, idx in zip(results, [0, 2]):
        W = model[idx].weight.detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        post = torch.relu(Phi @ W.T)
        assert r.shape == tuple(W.shape)
        assert r.nc1_input == pytest.approx(metrics.nc1(Phi, y), rel=1e-12)
        assert r.nc1_right == pytest.approx(metrics.nc1(Phi @ Vh.T * S, y), rel=1e-10)
        assert r.nc1_right == pytest.approx(metrics.nc1(Phi @ W.T, y), rel=1e-10)
        assert r.nc1_output == pytest.approx(metrics.nc1(post, y), rel=1e-12)
        assert r.nc2_output == pytest.approx(metrics.nc2(post, y), rel=1e-12)
        assert r.right_share == pytest.approx(right_singular_share(r.nc1_input, r.nc1_right, r.nc1_output),
                                              nan_ok=True)
        G = layer_agop(model[idx:], Phi, mean=True)
        assert r.nfa_agop == pytest.approx(pearson(W.T @ W, G), rel=1e-10)
        assert r.nfa_agop_sqrt == pytest.approx(pearson(W.T @ W, psd_sqrt(G)), rel=1e-10)
        Phi = post
    every = collapse_by_layer(model, X, y, layers="all")
    assert len(every) == 3 and every[-1].nfa_agop == pytest.approx(1.0)
    assert every[-1].nc1_output == pytest.approx(every[-1].nc1_right, rel=1e-10)


def test_nonnegative_layer_collapses_entirely_in_the_right_singular_step(rng):
    X, y = _two_class_data(rng)
    W = torch.zeros(2, 6, dtype=torch.float64)
    W[0, 0] = 1.0
    W[1, 1] = 0.5
    layer = nn.Linear(6, 2, bias=False).double()
    layer.weight.data.copy_(W)
    (r,) = collapse_by_layer([layer, nn.Linear(2, 2, bias=False).double()], X, y, nfa=False)
    assert r.nc1_output == pytest.approx(r.nc1_right, rel=1e-12)
    assert r.nc1_right < r.nc1_input
    assert r.right_share == pytest.approx(1.0)
    assert math.isnan(r.nfa_agop)


def test_balanced_linear_network_satisfies_the_ansatz_with_the_square_root(rng):
    d, p = 5, 4
    W1 = torch.randn(p, d, generator=rng, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W1, full_matrices=False)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=rng, dtype=torch.float64))
    W2 = Q @ torch.diag(S) @ U.T
    l1, l2 = nn.Linear(d, p, bias=False).double(), nn.Linear(p, p, bias=False).double()
    l1.weight.data.copy_(W1)
    l2.weight.data.copy_(W2)
    X = torch.randn(30, d, generator=rng, dtype=torch.float64)
    y = torch.arange(30) % 3
    (r,) = collapse_by_layer([l1, l2], X, y, activation=lambda t: t)
    assert r.nfa_agop_sqrt == pytest.approx(1.0, abs=1e-10)
    assert r.nfa_agop < 0.999


def test_linear_layer_interface_reproduces_the_sequential_result(rng):
    X, y = _two_class_data(rng)
    model = paper_mlp(6, 2, width=8, depth=2, seed=4, dtype=torch.float64)
    ref = collapse_by_layer(model, X, y)
    Phi = torch.relu(X @ model[0].weight.T)
    spec = LinearLayer(model[2].weight, features=Phi, head=model[2:], activation=torch.relu, name="hidden 2")
    (out,) = collapse_by_layer([spec], X, y)
    assert out.name == "hidden 2"
    for key in ("nc1_input", "nc1_right", "nc1_output", "nfa_agop", "nfa_agop_sqrt"):
        assert getattr(out, key) == pytest.approx(getattr(ref[1], key), rel=1e-10)
    with pytest.raises(ValueError, match="do not match"):
        collapse_by_layer([LinearLayer(model[2].weight, features=X, head=None)], X, y)


def test_layers_of_rejects_other_models():
    with pytest.raises(TypeError):
        layers_of(nn.Linear(3, 3))
    with pytest.raises(ValueError):
        layers_of([])
    with pytest.raises(ValueError, match="no nn.Linear"):
        layers_of(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError):
        layers_of([nn.Linear(3, 3), "relu"])


def test_paper_mlp_structure_init_and_seeding():
    model = paper_mlp(64, 10, width=32, depth=5, init_gain=0.1, seed=7)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(32, 64)] + [(32, 32)] * 4 + [(10, 32)]
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, nn.ReLU) for m in model) == 5 and isinstance(model[-1], nn.Linear)
    for m in linears:
        fan_out, fan_in = m.weight.shape
        assert float(m.weight.detach().abs().max()) <= 0.1 * math.sqrt(6 / (fan_in + fan_out))
    again = paper_mlp(64, 10, width=32, depth=5, init_gain=0.1, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(ValueError):
        paper_mlp(4, 2, init_gain=0.0)


def test_pm_one_targets():
    t = pm_one_targets(torch.tensor([2, 0]), 3)
    assert torch.equal(t, torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, -1.0]]))


def test_train_mlp_is_reproducible_and_learns(rng):
    X, y = _two_class_data(rng, n=64)
    X = X.float()

    def fit():
        model = paper_mlp(6, 2, width=16, depth=2, init_gain=1.0, seed=1)
        history = train_mlp(model, X, y, epochs=25, lr=1e-2, batch_size=16, seed=5)
        return model, history

    (m1, h1), (m2, h2) = fit(), fit()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert [s.train_loss for s in h1] == [s.train_loss for s in h2]
    assert h1[-1].train_loss < 0.1 * h1[0].train_loss and h1[-1].train_acc >= 0.95


def _run_cli(tmp_path, *extra):
    from rfm_fast.nn.cli import main

    return main(["--epochs", "2", "--width", "16", "--depth", "2", "--record-every", "1", "--batch-size", "32",
                 "--out", str(tmp_path), "--no-progress", "--agop-samples", "50", *extra])


def test_cli_on_digits_writes_measures_and_plots(tmp_path, capsys):
    assert _run_cli(tmp_path, "--dataset", "digits", "--n", "150") == 0
    text = capsys.readouterr().out
    assert "right share" in text and "corr AGOP^1/2" in text
    data = json.loads((tmp_path / "measures.json").read_text())
    assert [record["epoch"] for record in data["history"]] == [0, 1, 2]
    assert data["n_train"] == 150 and len(data["final"]["layers"]) == 2
    rows = (tmp_path / "measures.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * 2
    for name in ("nc1_by_layer.png", "nfa_over_training.png", "nc1_over_training.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_on_npz_is_seeded(tmp_path):
    gen = np.random.default_rng(0)
    X = gen.normal(size=(60, 7)).astype(np.float32)
    y = np.arange(60) % 3
    X[np.arange(60), y] += 3
    path = tmp_path / "toy.npz"
    np.savez(path, X_train=X[:48], y_train=y[:48], X_test=X[48:], y_test=y[48:])
    outs = []
    for k in range(2):
        assert _run_cli(tmp_path / f"run{k}", "--dataset", str(path), "--no-plots") == 0
        outs.append(json.loads((tmp_path / f"run{k}" / "measures.json").read_text())["history"])
    assert outs[0] == outs[1]
    assert outs[0][-1]["test_acc"] is not None
