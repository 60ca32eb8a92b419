"""``rfm-fast nn-collapse``: train the seed paper's MLP and measure, layer by layer, where within-class variability
collapses (right singular step vs nonlinearity) and how W^T W correlates with the AGOP (neural feature ansatz).

rfm_fast/cli.py mounts it with ``add_arguments(subparser)`` / ``run(args)``; ``python -m rfm_fast.nn`` runs it alone.
Outputs in --out: measures.json (configuration, per-epoch history, final table), measures.csv (one row per recorded
epoch and layer), nc1_by_layer.png, nfa_over_training.png, nc1_over_training.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys
import time
from typing import Optional

import torch

DEFAULTS = dict(epochs=300, lr=1e-3, batch_size=128, width=512, depth=5, init_gain=0.1, record_every=20,
                agop_samples=1000, seed=0)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the nn-collapse options to ``parser`` (a subcommand parser or a fresh one)."""
    from ..cli import _positive_int, device_type, nonnegative_int, positive_float

    d = DEFAULTS
    parser.add_argument("--dataset", default="digits",
                        help="digits, mnist, cifar10, svhn or a PATH.npz with X_train, y_train[, X_test, y_test] "
                             "(default: digits)")
    parser.add_argument("--n", type=_positive_int, default=None, help="training samples (default: all)")
    parser.add_argument("--n-test", type=_positive_int, default=None, help="test samples (default: all)")
    parser.add_argument("--epochs", type=_positive_int, default=d["epochs"], help=f"epochs (default: {d['epochs']})")
    parser.add_argument("--lr", type=positive_float, default=d["lr"], help=f"Adam learning rate (default: {d['lr']})")
    parser.add_argument("--batch-size", type=_positive_int, default=d["batch_size"],
                        help=f"minibatch size (default: {d['batch_size']})")
    parser.add_argument("--width", type=_positive_int, default=d["width"],
                        help=f"hidden width (default: {d['width']})")
    parser.add_argument("--depth", type=_positive_int, default=d["depth"],
                        help=f"number of hidden layers (default: {d['depth']})")
    parser.add_argument("--init-gain", type=positive_float, default=d["init_gain"],
                        help="Xavier-uniform gain; small values (the default, "
                             f"{d['init_gain']}) give the feature-learning regime")
    parser.add_argument("--record-every", type=_positive_int, default=d["record_every"],
                        help="measure every k epochs (and at epoch 0 and the last epoch; default: "
                             f"{d['record_every']})")
    parser.add_argument("--agop-samples", type=nonnegative_int, default=d["agop_samples"],
                        help=f"training samples the AGOPs are averaged over (seeded subset; 0 = all; default: "
                             f"{d['agop_samples']})")
    parser.add_argument("--seed", type=int, default=d["seed"], help=f"seed (default: {d['seed']})")
    parser.add_argument("--device", type=device_type, default="cpu",
                        help="cpu, cuda, cuda:1, ... or auto (cuda when available; default: cpu)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="nn-collapse-out",
                        help="folder for the JSON/CSV measures and PNG plots (default: nn-collapse-out)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def _write_csv(path: pathlib.Path, history: list[dict]) -> None:
    fields = ["epoch", "train_loss", "train_acc", "test_acc", "layer", "name", "shape", "nc1_input", "nc1_right",
              "nc1_output", "nc2_input", "nc2_right", "nc2_output", "right_share", "nfa_agop", "nfa_agop_sqrt"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for record in history:
            for k, layer in enumerate(record["layers"]):
                row = {key: record[key] for key in ("epoch", "train_loss", "train_acc", "test_acc")}
                row.update(layer, layer=k + 1, shape="x".join(map(str, layer["shape"])))
                writer.writerow(row)


def _plots(out: pathlib.Path, history: list[dict], dataset: str) -> list[pathlib.Path]:
    from ..plots import short_name
    from .collapse import LayerCollapse
    from .plots import plot_nc1_by_layer, plot_over_training

    dataset = short_name(dataset)

    final = [LayerCollapse(**{**layer, "shape": tuple(layer["shape"])}) for layer in history[-1]["layers"]]
    epochs = [record["epoch"] for record in history]
    series = {key: [[record["layers"][k][key] for record in history] for k in range(len(final))]
              for key in ("nfa_agop_sqrt", "nfa_agop", "nc1_input", "nc1_output")}
    paths = [out / "nc1_by_layer.png", out / "nfa_over_training.png", out / "nc1_over_training.png"]
    plot_nc1_by_layer(final, paths[0], title=f"{dataset}, epoch {epochs[-1]}: NC1 at each hidden layer")
    plot_over_training(epochs, series["nfa_agop_sqrt"], paths[1], ylabel="Pearson correlation with W^T W",
                       title=f"{dataset}: neural feature ansatz per layer", dashed=series["nfa_agop"],
                       solid_label="AGOP^1/2", dashed_label="AGOP")
    plot_over_training(epochs, series["nc1_input"], paths[2], ylabel="NC1 of the layer input", log=True,
                       title=f"{dataset}: NC1 of each layer's input over training")
    return paths


def run(args: argparse.Namespace) -> int:
    """Train, record, print the final per-layer table and write the outputs. Returns the exit status (0)."""
    from tqdm.auto import tqdm

    from ..data import train_test
    from .collapse import collapse_by_layer, format_table
    from .mlp import accuracy, paper_mlp, train_mlp

    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.record_every < 1 or args.epochs < 0:
        raise ValueError("--record-every must be >= 1 and --epochs >= 0")
    device = _device(args.device)
    torch.manual_seed(args.seed)
    X_tr, y_tr, X_te, y_te = train_test(args.dataset, args.n, args.n_test, seed=args.seed)
    X_tr, X_te = torch.as_tensor(X_tr).to(device), torch.as_tensor(X_te).to(device)
    y_tr, y_te = torch.as_tensor(y_tr).long(), torch.as_tensor(y_te).long()
    n_classes = int(y_tr.max()) + 1
    model = paper_mlp(X_tr.shape[1], n_classes, width=args.width, depth=args.depth, init_gain=args.init_gain,
                      seed=args.seed, device=device)
    has_test = X_te.shape[0] > 0
    agop_samples = args.agop_samples or None

    history: list[dict] = []

    def record(epoch: int, loss: float, train_acc: float, test_acc: Optional[float]) -> None:
        model.eval()
        layers = collapse_by_layer(model, X_tr, y_tr, agop_samples=agop_samples, seed=args.seed)
        history.append(dict(epoch=epoch, train_loss=loss, train_acc=train_acc, test_acc=test_acc,
                            layers=[layer.as_dict() for layer in layers]))

    with torch.no_grad():
        init_loss = float(((model(X_tr) - (2 * torch.nn.functional.one_hot(y_tr.to(device), n_classes) - 1)) ** 2)
                          .mean())
    record(0, init_loss, accuracy(model, X_tr, y_tr), accuracy(model, X_te, y_te) if has_test else None)
    bar = tqdm(total=args.epochs, desc=f"nn-collapse {args.dataset}", disable=args.no_progress, unit="epoch",
               file=sys.stderr)

    def on_epoch(stats) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{stats.train_loss:.4f}", train_acc=f"{stats.train_acc:.3f}")
        if stats.epoch % args.record_every == 0 or stats.epoch == args.epochs:
            record(stats.epoch, stats.train_loss, stats.train_acc, stats.test_acc)

    train_mlp(model, X_tr, y_tr, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
              X_test=X_te if has_test else None, y_test=y_te if has_test else None, on_epoch=on_epoch)
    bar.close()
    wall = time.perf_counter() - start

    final = history[-1]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("dataset", "n", "n_test", "epochs", "lr", "batch_size", "width", "depth",
                                             "init_gain", "record_every", "agop_samples", "seed", "device")}
    with open(out / "measures.json", "w") as f:
        json.dump(dict(config=config, n_train=int(X_tr.shape[0]), n_test=int(X_te.shape[0]),
                       wall_time_s=wall, history=history, final=final), f, indent=1, allow_nan=True)
    _write_csv(out / "measures.csv", history)
    written = [out / "measures.json", out / "measures.csv"]
    if not args.no_plots:
        written += _plots(out, history, args.dataset)

    from .collapse import LayerCollapse

    rows = [LayerCollapse(**{**layer, "shape": tuple(layer["shape"])}) for layer in final["layers"]]
    test = f", test accuracy {final['test_acc']:.4f}" if final["test_acc"] is not None else ""
    print(f"{args.dataset}: {X_tr.shape[0]} train samples, epoch {final['epoch']}, train loss "
          f"{final['train_loss']:.3g}, train accuracy {final['train_acc']:.4f}{test}, wall time {wall:.1f} s")
    print(format_table(rows))
    shares = [r.right_share for r in rows]
    majority = sum(1 for s in shares if not math.isnan(s) and s > 0.5)
    print(f"right singular step did the majority of the NC1 drop in {majority} of {len(rows)} layers")
    if final["train_acc"] < 0.99:
        print(f"note: train accuracy {final['train_acc']:.4f} < 0.99; the collapse measures describe an "
              "unconverged network (raise --epochs)")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from ..cli import Parser

    parser = add_arguments(Parser(prog="rfm-fast nn-collapse", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
