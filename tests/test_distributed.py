"""rfm_fast.distributed on 2 gloo processes started by torchrun (loopback only), against the single-process ops.

One torchrun launch runs every sharded computation (this file is also the worker script: ``python
tests/test_distributed.py OUT_DIR`` under torchrun) and saves each rank's results; the tests compare them with
the single-process ops run here in float64. Sum orders differ across ranks, so agreement is to rounding (relative
Frobenius error against the float64 table), not bitwise; the two ranks must agree with each other exactly.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import torch

N_POINTS, N_CENTRES, D, C = 61, 83, 7, 3
N_SOLVE = 300


def make_problem() -> dict:
    """The seeded inputs every process rebuilds identically."""
    g = torch.Generator().manual_seed(7)
    f64 = torch.float64
    A = torch.randn(D, D, generator=g, dtype=f64)
    z = torch.randn(N_SOLVE, 3, generator=g, dtype=f64)
    solve_X = z @ torch.randn(3, D, generator=g, dtype=f64) + 0.3 * torch.randn(N_SOLVE, D, generator=g, dtype=f64)
    return {
        "x": torch.randn(N_POINTS, D, generator=g, dtype=f64),
        "centers": torch.randn(N_CENTRES, D, generator=g, dtype=f64),
        "alpha": torch.randn(N_CENTRES, C, generator=g, dtype=f64),
        "M": A @ A.T / D,
        "M_diag": torch.rand(D, generator=g, dtype=f64) + 0.1,
        "X": solve_X,
        "Y": torch.randn(N_SOLVE, C, generator=g, dtype=f64),
    }


AGOP_CASES = {
    "laplace_dense": dict(kernel="laplace", bandwidth=2.0, metric="M", centered=False, diag=False),
    "laplace_dense_centered": dict(kernel="laplace", bandwidth=2.0, metric="M", centered=True, diag=False),
    "gaussian_diag_centered_diag": dict(kernel="gaussian", bandwidth=1.5, metric="M_diag", centered=True,
                                        diag=True),
    "laplace_identity_diag": dict(kernel="laplace", bandwidth=3.0, metric=None, centered=False, diag=True),
}
SOLVE = dict(kernel="laplace", bandwidth=2.0, reg=1e-3, rank=40, seed=3, backend="torch")
RFM = dict(kernel="laplace", bandwidth=2.0, reg=1e-3, rank=40, backend="torch")
NYSTROM = dict(kernel="laplace", bandwidth=2.0, reg=1e-3, backend="torch")


def _agop_args(p: dict, case: dict) -> dict:
    return dict(kernel=case["kernel"], bandwidth=case["bandwidth"], M=p[case["metric"]] if case["metric"] else None,
                centered=case["centered"], diag=case["diag"], backend="torch")


def worker(out_dir: str) -> None:
    import rfm_fast.distributed as rd

    torch.set_num_threads(1)
    rank, world = rd.init("gloo")
    p = make_problem()
    out = {"world": world}
    # Uneven split of the evaluation points (rank 0 gets 23 of 61), and a split where the last rank gets none.
    cut = 23 if rank == 0 else N_POINTS
    lo = 0 if rank == 0 else 23
    for name, case in AGOP_CASES.items():
        out[f"agop/{name}"] = rd.agop(p["x"][lo:cut], p["centers"], p["alpha"], **_agop_args(p, case))
    mine = p["x"] if rank == 0 else p["x"][:0]
    out["agop/empty_rank"] = rd.agop(mine, p["centers"], p["alpha"], **_agop_args(p, AGOP_CASES["laplace_dense"]))
    part = rd.shard(N_CENTRES)
    out["kernel_mv"] = rd.kernel_mv(p["x"], p["centers"][part], p["alpha"][part], kernel="gaussian", bandwidth=1.5,
                                    M=p["M"], backend="torch")
    alpha, info = rd.nystrom_pcg(p["X"], p["Y"], tol=1e-10, **SOLVE)
    out["pcg64"], out["pcg64_info"] = alpha, info
    alpha, info = rd.nystrom_pcg(p["X"].float(), p["Y"].float(), tol=1e-4, **SOLVE)
    out["pcg32"], out["pcg32_info"] = alpha, info
    rows = slice(0, 100) if rank == 0 else slice(100, N_SOLVE)  # uneven rows of K_nm
    idx = torch.arange(0, N_SOLVE, 3)
    alpha, info = rd.nystrom_krr(p["X"][rows], p["Y"][rows], p["X"][idx], tol=1e-12, **NYSTROM)
    out["nystrom64"], out["nystrom64_info"] = alpha, info
    mine = slice(0, N_SOLVE) if rank == 0 else slice(0, 0)  # all rows on one rank, none on the other
    out["nystrom64_lopsided"], _ = rd.nystrom_krr(p["X"][mine], p["Y"][mine], p["X"][idx], tol=1e-12, **NYSTROM)
    alpha, M, history = rd.fit_rfm(p["X"], p["Y"], iters=1, tol=1e-12, centres=60, seed=4, **RFM)
    out["rfm_nystrom_M"], out["rfm_nystrom_alpha"] = M, alpha
    out["rfm_nystrom_centres"] = history[0]["centres"]
    alpha, M, history = rd.fit_rfm(p["X"], p["Y"], iters=1, tol=1e-12, **RFM)
    out["rfm_M"], out["rfm_pred"] = M, rd.predict(p["x"], p["X"], alpha, kernel="laplace", bandwidth=2.0, M=M,
                                                  backend="torch")
    torch.save(out, pathlib.Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
else:
    import pytest

    import rfm_fast
    from rfm_fast.solvers.preconditioned import nystrom_pcg
    from .tolerances import REL_FRO, rel_fro

    def _free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @pytest.fixture(scope="module")
    def ranks(tmp_path_factory):
        out = tmp_path_factory.mktemp("dist")
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
        if pathlib.Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on loopback whatever the hostname resolves to
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]

    @pytest.fixture(scope="module")
    def problem():
        return make_problem()

    def test_two_ranks_ran(ranks):
        assert [r["world"] for r in ranks] == [2, 2]

    @pytest.mark.parametrize("name", sorted(AGOP_CASES))
    def test_sharded_agop_matches_single_process(ranks, problem, name):
        case = AGOP_CASES[name]
        ref = rfm_fast.agop(problem["x"], problem["centers"], problem["alpha"], **_agop_args(problem, case))
        for r in ranks:
            assert rel_fro(r[f"agop/{name}"], ref) <= REL_FRO[torch.float64]
        assert torch.equal(ranks[0][f"agop/{name}"], ranks[1][f"agop/{name}"])

    def test_sharded_agop_with_an_empty_rank(ranks, problem):
        ref = rfm_fast.agop(problem["x"], problem["centers"], problem["alpha"],
                            **_agop_args(problem, AGOP_CASES["laplace_dense"]))
        assert rel_fro(ranks[1]["agop/empty_rank"], ref) <= REL_FRO[torch.float64]

    def test_sharded_kernel_mv_matches_single_process(ranks, problem):
        ref = rfm_fast.kernel_mv(problem["x"], problem["centers"], problem["alpha"], kernel="gaussian",
                                 bandwidth=1.5, M=problem["M"], backend="naive")
        for r in ranks:
            assert rel_fro(r["kernel_mv"], ref) <= REL_FRO[torch.float64]

    def test_sharded_pcg_matches_single_process_float64(ranks, problem):
        alpha, info = nystrom_pcg(problem["X"], problem["Y"], tol=1e-10, **SOLVE)
        for r in ranks:
            assert r["pcg64_info"]["converged"] and r["pcg64_info"]["residual"] <= 1e-10
            assert abs(r["pcg64_info"]["iterations"] - info["iterations"]) <= 1
            assert rel_fro(r["pcg64"], alpha) <= 1e-8
        assert torch.equal(ranks[0]["pcg64"], ranks[1]["pcg64"])

    def test_sharded_pcg_float32_reaches_its_tolerance(ranks, problem):
        X, Y = problem["X"], problem["Y"]
        K = rfm_fast.kernel_matrix(X.float().double(), X.float().double(), kernel="laplace", bandwidth=2.0,
                                   backend="naive")
        for r in ranks:
            alpha = r["pcg32"].double()
            resid = (Y.float().double() - K @ alpha - 1e-3 * alpha).norm(dim=0) / Y.float().double().norm(dim=0)
            assert r["pcg32_info"]["converged"] and float(resid.max()) <= 1e-4

    def test_sharded_rfm_fit_matches_the_estimator(ranks, problem):
        # rfm_fast.RFM with a direct solve in float64; the sharded fit solves to 1e-12, so M agrees to ~1e-9.
        model = rfm_fast.RFM(kernel="laplace", bandwidth=2.0, reg=1e-3, iters=1, task="regression",
                             dtype="float64", solver="cholesky", backend="torch").fit(problem["X"], problem["Y"])
        ref_pred = model.decision_function(problem["x"])
        for r in ranks:
            assert rel_fro(r["rfm_M"], model.M_) <= 1e-8
            assert rel_fro(r["rfm_pred"], ref_pred) <= 1e-8

    def test_sharded_nystrom_equals_the_single_process_solve(ranks, problem):
        """Rows of K_nm split 100 / 200 and 300 / 0 across the ranks: float64 alpha equal to 1e-10."""
        alpha, info = rfm_fast.krr_solve(problem["X"], problem["Y"], solver="nystrom",
                                         centres=torch.arange(0, N_SOLVE, 3), tol=1e-12, return_info=True, **NYSTROM)
        for r in ranks:
            assert r["nystrom64_info"]["converged"] and r["nystrom64_info"]["world_size"] == 2
            assert rel_fro(r["nystrom64"], alpha) <= 1e-10
            assert rel_fro(r["nystrom64_lopsided"], alpha) <= 1e-10
        assert torch.equal(ranks[0]["nystrom64"], ranks[1]["nystrom64"])

    def test_sharded_nystrom_rfm_matches_the_estimator(ranks, problem):
        model = rfm_fast.RFM(solver="nystrom", centres=60, random_state=4, iters=1, task="regression",
                             dtype="float64", kernel="laplace", bandwidth=2.0, reg=1e-3, backend="torch")
        model.fit(problem["X"], problem["Y"])
        for r in ranks:
            assert torch.equal(problem["X"][r["rfm_nystrom_centres"]], model.X_fit_)
            assert rel_fro(r["rfm_nystrom_M"], model.M_) <= 1e-8
            assert rel_fro(r["rfm_nystrom_alpha"], model.alpha_) <= 1e-8
