"""The rfm-fast command (run as a user would, on tiny settings) and the dataset loader behind it."""

import argparse
import csv
import json
import pathlib

import numpy as np
import pytest

from rfm_fast import cli
from rfm_fast.data import load_dataset, train_test

TINY = pathlib.Path(__file__).parent / "data" / "tiny_images.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_deep_rfm_command_writes_table_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["deep-rfm", "--dataset", "digits", "--n", "150", "--n-test", "40", "--depth", "2",
                     "--width", "64", "--control", "--gram-per-class", "5", "--quiet", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "NC1 in" in text and "control (identity projection)" in text and "test acc" in text
    for name in ("collapse.png", "gram.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    report = json.loads((out / "metrics.json").read_text())
    assert [r["projection"] for r in report["runs"]] == ["agop", "identity"]
    assert report["config"]["depth"] == 2 and len(report["runs"][0]["metrics"]) == 2
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("projection,layer,nc1_input") and len(rows) == 1 + 2 * 2
    assert "solve s" in text and "AGOP s" in text and "feat map s" in text
    with open(out / "metrics.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 4
    for record in records:
        for key in ("solve_s", "agop_s", "feature_map_s"):
            assert float(record[key]) >= 0
        assert (float(record["agop_s"]) > 0) == (record["projection"] == "agop")
    for run in report["runs"]:
        assert all(m["solve_s"] >= 0 and m["feature_map_s"] >= 0 for m in run["metrics"])


def test_deep_rfm_command_on_an_npz_without_plots(tmp_path, capsys):
    code = cli.main(["deep-rfm", "--dataset", str(TINY), "--depth", "2", "--width", "32", "--feature-map",
                     "cosine", "--quiet", "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    assert "3 classes" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "metrics.json").exists()


def test_deep_rfm_threads_preprocess_verbose_and_input_width(tmp_path, capsys, monkeypatch):
    import torch

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # record, leave the test process alone
    code = cli.main(["deep-rfm", "--dataset", str(TINY), "--depth", "2", "--feature-map", "cosine", "--gamma",
                     "0.05", "--threads", "1", "--preprocess", "unit", "--verbose", "--quiet", "--no-plots",
                     "--out", str(tmp_path)])
    assert code == 0 and threads == [1]
    text = capsys.readouterr().out
    assert "(unit)" in text and "cosine width 16" in text  # width = the input dimension by default for cosine
    assert "DeepRFM layer 1/2: solve" in text and "DeepRFM layer 2/2: solve" in text
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert config["threads"] == 1 and config["preprocess"] == "unit" and config["verbose"] is True
    assert config["width"] is None
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["solve_s", "agop_s", "feature_map_s"]

    threads.clear()
    code = cli.main(["deep-rfm", "--dataset", str(TINY), "--depth", "1", "--width", "input", "--preprocess",
                     "none", "--quiet", "--no-plots"])
    assert code == 0 and threads == []  # no --threads: torch's default is left alone
    text = capsys.readouterr().out
    assert "(none)" in text and "relu width 16" in text and "DeepRFM layer" not in text


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--threads", "two"], ["--width", "wide"],
                                 ["--width", "0"], ["--preprocess", "minmax"]])
def test_deep_rfm_rejects_bad_flags(bad, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["deep-rfm", "--dataset", str(TINY), *bad])
    assert info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_deep_rfm_help_documents_the_paper_settings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["deep-rfm", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--threads", "1 thread can be much faster", "--preprocess", "standardize", "unit", "--verbose",
                   "'input' for cosine", "0.05 for MNIST-like data", "0.1 for CIFAR-10/SVHN-like data"):
        assert phrase in text, phrase


def test_missing_subcommand_module_fails_clearly(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATED, "bench", ("rfm_fast._no_such_module", "missing"))
    assert cli.main(["bench", "--anything", "1"]) == 2
    assert "rfm-fast bench is not available" in capsys.readouterr().err
    # The other subcommands still parse.
    with pytest.raises(SystemExit) as info:
        cli.main(["deep-rfm", "--help"])
    assert info.value.code == 0


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "deep-rfm" in capsys.readouterr().err


def test_table_format():
    metrics = [{"nc1_input": 0.5, "nc1_projected": 0.1, "nc1_features": 0.2, "nc2_input": 0.3,
                "nc2_projected": 0.2, "nc2_features": 0.1, "train_accuracy": 1.0}]
    table = cli.format_table(metrics).splitlines()
    assert "test acc" not in table[0] and table[2].split()[0] == "1" and "5.000e-01" in table[2]
    assert "solve s" not in table[0]  # only the columns the metrics have
    metrics[0].update(solve_s=1.25, agop_s=0.5, feature_map_s=0.125)
    table = cli.format_table(metrics).splitlines()
    assert table[0].split()[-7:] == ["solve", "s", "AGOP", "s", "feat", "map", "s"]
    assert table[2].split()[-3:] == ["1.250", "0.500", "0.125"]


def test_npz_loading_preprocesses_like_the_paper():
    X, y, Xt, yt = train_test(TINY, n=30, n_test=12)
    assert X.shape == (30, 16) and Xt.shape == (12, 16) and X.dtype == np.float32
    assert set(np.unique(np.concatenate([y, yt]))) <= {0, 1, 2} and y.dtype == np.int64
    np.testing.assert_allclose(X.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(X.std(0)[X.std(0) > 0], 1, atol=1e-4)
    with np.load(TINY) as raw:
        np.testing.assert_array_equal(np.array([2, 5, 9])[y], raw["y_train"][:30])  # first n rows, in order
    X_all, _ = load_dataset(TINY)
    assert X_all.shape == (60, 16)
    X_test, y_test = load_dataset(TINY, 5, split="test")
    assert X_test.shape == (5, 16) and y_test.shape == (5,)


def test_npz_without_test_split_and_errors(tmp_path):
    path = tmp_path / "train_only.npz"
    np.savez(path, X_train=np.arange(12.0).reshape(4, 3), y_train=np.array([0, 1, 0, 1]))
    X, y, Xt, yt = train_test(path)
    assert X.shape == (4, 3) and Xt.shape == (0, 3) and yt.shape == (0,)
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="X_train and y_train"):
        train_test(bad)
    with pytest.raises(FileNotFoundError):
        train_test(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="dataset must be one of"):
        train_test("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")


def test_digits_split_is_seeded_and_standardised():
    a = train_test("digits", seed=0)
    b = train_test("digits", seed=0)
    c = train_test("digits", seed=1)
    assert a[0].shape == (1437, 64) and a[2].shape == (360, 64)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])
    assert np.bincount(a[3]).min() >= 35  # stratified 80/20


def test_torchvision_datasets_need_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision"):
            train_test("mnist", n=10)
    else:
        pytest.skip("torchvision is installed: this checks the message shown without it")


@pytest.mark.parametrize("argv,needle", [
    (["deep-rfm", "--dataset", "nope"], "dataset must be one of"),
    (["deep-rfm", "--dataset", "MISSING.npz"], "no dataset file"),
    (["deep-rfm", "--dataset", "NOTNPZ"], "is not a .npz archive"),
    (["deep-rfm", "--bandwidth", "-1"], "--bandwidth"),
    (["deep-rfm", "--reg", "-0.1"], "--reg"),
    (["deep-rfm", "--n", "-5"], "--n"),
    (["deep-rfm", "--depth", "0"], "--depth"),
    (["deep-rfm", "--device", "cuda:7"], "--device"),
    (["bench", "--backends", "tourch"], "unknown backend 'tourch'"),
    (["bench", "--reps", "0"], "--reps"),
    (["nn-collapse", "--epochs", "0"], "--epochs"),
])
def test_user_mistakes_end_in_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    """An ordinary mistake prints one line on stderr (no traceback, no progress bar) and exits with code 2."""
    argv = [str(tmp_path / "missing.npz") if a == "MISSING.npz" else a for a in argv]
    if "NOTNPZ" in argv:
        bad = tmp_path / "bad.npz"
        bad.write_bytes(b"not an archive")
        argv = [str(bad) if a == "NOTNPZ" else a for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in captured.err, captured.err
    assert "%" not in captured.err and captured.out == ""


def test_debug_shows_the_traceback_and_version_prints(capsys):
    with pytest.raises(ValueError, match="dataset must be one of"):
        cli.main(["deep-rfm", "--dataset", "nope", "--debug"])
    with pytest.raises(ValueError, match="dataset must be one of"):
        cli.main(["--debug", "deep-rfm", "--dataset", "nope"])
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("rfm-fast ")


def test_every_flag_has_help(capsys):
    for sub in ("deep-rfm", "bench", "nn-collapse"):
        parser = cli.build_parser([sub])
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for flag in action.choices[sub]._actions:
            if flag.help != argparse.SUPPRESS:
                assert flag.help, (sub, flag.option_strings)


def test_bench_summary_says_slower_when_slower():
    from rfm_fast.bench import Row, format_table

    rows = [Row(100, 100, 8, 2, "laplace", "float32", "torch", 2.0, 1.0, 50.0, 1.0),
            Row(100, 100, 8, 2, "laplace", "float32", "xrfm", 1.0, 1.0, 25.0, 1.0)]
    text = format_table(rows)
    assert "2.0x slower than xrfm" in text and "2.0x more extra memory" in text and "faster" not in text


def test_bench_skips_peer_rows_that_would_not_fit(capsys):
    """A peer row whose estimated memory exceeds --peer-memory is left out, and the output says so."""
    from rfm_fast.bench import measure

    skipped, failed = [], []
    rows = measure([(64, 4, 2)], ["torch", "xrfm"], reps=1, memory=False, log=lambda s: None, failed=failed,
                   skipped=skipped, peer_memory=1e-9)
    assert [r.backend for r in rows] == ["gemm-floor", "torch"] and failed == []
    assert len(skipped) == 1 and "xrfm skipped at n=64" in skipped[0] and "--peer-memory" in skipped[0]
