"""The ``rfm-fast`` command.

    rfm-fast deep-rfm --dataset digits --depth 8 --control --out results/digits
    rfm-fast deep-rfm --dataset mnist --feature-map cosine --gamma 0.05 --preprocess unit --threads 1
                    (the paper's cosine random features: width = the input dimension by default)
    rfm-fast bench          (the AGOP speed table, rfm_fast.bench)
    rfm-fast nn-collapse    (neural collapse in trained networks, rfm_fast.nn.cli)

``bench`` and ``nn-collapse`` live in their own modules, imported only when their subcommand runs, so a part
that is missing or broken makes only its own subcommand fail, with a message saying why.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

# subcommand -> (module, one-line help); each module provides add_arguments(parser) and run(args) -> int.
DELEGATED = {
    "bench": ("rfm_fast.bench", "print the AGOP speed table (backends against a GEMM floor)"),
    "nn-collapse": ("rfm_fast.nn.cli", "measure neural collapse and AGOP alignment in trained networks"),
}
COLUMNS = (("layer", "layer", "{:d}"), ("nc1_input", "NC1 in", "{:.3e}"), ("nc1_projected", "NC1 proj", "{:.3e}"),
           ("nc1_features", "NC1 feat", "{:.3e}"), ("nc2_input", "NC2 in", "{:.3e}"),
           ("nc2_projected", "NC2 proj", "{:.3e}"), ("nc2_features", "NC2 feat", "{:.3e}"),
           ("train_accuracy", "train acc", "{:.4f}"), ("test_accuracy", "test acc", "{:.4f}"),
           ("solve_s", "solve s", "{:.3f}"), ("agop_s", "AGOP s", "{:.3f}"), ("feature_map_s", "feat map s", "{:.3f}"))


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)`` on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# What a user's mistake raises inside a command (a bad dataset name or file, a value a model rejects, a missing
# optional dependency): reported in one line with exit code 2; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def _number(kind, low: float, inclusive: bool, what: str):
    """An argparse type: a ``kind`` number above ``low`` (or at least ``low``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_float = _number(float, 0.0, False, "a number > 0")
nonnegative_int = _number(int, 0, True, "an integer >= 0")
nonnegative_float = _number(float, 0.0, True, "a number >= 0")


def device_type(text: str) -> str:
    """An argparse type: a torch device that exists here ("auto" passes through)."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available in this torch installation "
                                             f"(torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}")
    return text


def _positive_int(text: str, also: str = "") -> int:
    """An argparse type: an integer >= 1 (the error names ``also``, the other values the option takes)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1{also}, got {text!r}")
    return value


def _width(text: str):
    """--width: a positive integer or "input" (the layer's input dimension)."""
    return text if text == "input" else _positive_int(text, " or 'input'")


def add_deep_rfm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits, mnist, cifar10, svhn (torchvision) or PATH.npz with X_train, y_train[, X_test, "
                        "y_test] (default: digits)")
    p.add_argument("--preprocess", choices=("standardize", "unit", "none"), default="standardize",
                   help="input preprocessing, with training-set statistics: standardize (per-feature mean 0, std 1; "
                        "the default), unit (divide by the training set's largest absolute value) or none "
                        "(torchvision images are already in [0, 1])")
    p.add_argument("--n", type=_positive_int, default=None, help="use the first N training examples (default: all)")
    p.add_argument("--n-test", type=_positive_int, default=None,
                   help="use the first N test examples (default: all)")
    p.add_argument("--depth", type=_positive_int, default=8, help="number of Deep RFM layers (default: 8)")
    p.add_argument("--kernel", choices=("laplace", "gaussian"), default="laplace", help="kernel (default: laplace)")
    p.add_argument("--bandwidth", type=positive_float, default=2.0, help="kernel bandwidth L (default: 2.0)")
    p.add_argument("--reg", type=nonnegative_float, default=1e-3, help="kernel ridge (default: 1e-3)")
    p.add_argument("--feature-map", choices=("relu", "cosine"), default="relu",
                   help="random feature map of each layer: relu (ReLU(z W^T), the default) or cosine (sqrt(2/D) "
                        "cos(z W^T + b) with i.i.d. Cauchy W and uniform b, as in the paper; the paper's setting "
                        "is --feature-map cosine with width = the input dimension, the default for cosine, and "
                        "--gamma 0.05 for MNIST-like data, 0.1 for CIFAR-10/SVHN-like data)")
    p.add_argument("--width", type=_width, default=None,
                   help="random features per layer: an integer, or 'input' for the input dimension (default: 1024 "
                        "for relu, 'input' for cosine, the paper's setting)")
    p.add_argument("--gamma", type=positive_float, default=None,
                   help="Cauchy scale of the cosine map's W (default: 1/bandwidth); the paper uses 0.05 for "
                        "MNIST-like data and 0.1 for CIFAR-10/SVHN-like data")
    p.add_argument("--projection", choices=("agop", "identity"), default="agop",
                   help="agop: project on the AGOP square root (Deep RFM); identity: skip it (the control)")
    p.add_argument("--control", action="store_true",
                   help="also run the identity-projection control with the same seed and plot it alongside")
    p.add_argument("--device", type=device_type, default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="working dtype (default: float32)")
    p.add_argument("--solver", choices=("auto", "cholesky", "cg", "pcg"), default="auto",
                   help="kernel ridge solver (default: auto)")
    p.add_argument("--backend", default="auto", help="ops backend (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and the feature maps (default: 0)")
    p.add_argument("--gram-per-class", type=_positive_int, default=30,
                   help="samples per class in the Gram-matrix figure (default: 30)")
    p.add_argument("--out", default=None, help="folder for metrics.json, metrics.csv and the PNG plots")
    p.add_argument("--no-plots", action="store_true", help="write no PNG files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="print one line per layer (solve / AGOP / feature-map seconds, accuracies) and show the "
                        "iterative solvers' progress bars")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads, torch.set_num_threads(N) before the run (default: torch's choice); on "
                        "a loaded machine with few cores (e.g. 2 cores shared with other work) 1 thread can be "
                        "much faster")


def _gram_layers(depth: int) -> list[int]:
    """0-based layers whose features go in the Gram figure: the first, two in between and the last."""
    picks = {0, depth // 4, depth // 2, depth - 1} if depth > 3 else set(range(depth))
    return sorted(picks)


def _fit(args, projection: str, data, subset, gram_layers):
    import torch
    from tqdm import tqdm

    from .models import DeepRFM
    from .plots import centred_gram

    X_train, y_train, X_test, y_test = data
    model = DeepRFM(depth=args.depth, kernel=args.kernel, bandwidth=args.bandwidth, reg=args.reg,
                    feature_map=args.feature_map, width=args.width, gamma=args.gamma, projection=projection,
                    random_state=args.seed, device=args.device, dtype=args.dtype, backend=args.backend,
                    solver=args.solver, verbose=args.verbose)
    grams = []
    index = torch.as_tensor(subset) if subset is not None else None
    bar = tqdm(total=args.depth, desc=f"Deep RFM ({projection})", unit="layer", disable=args.quiet,
               file=sys.stderr)

    def callback(layer: int, metrics: dict, tensors: dict) -> None:
        if layer == 0 and subset is not None:
            grams.append(("input data", centred_gram(tensors["input"][index.to(tensors["input"].device)])))
        if subset is not None and layer in gram_layers:
            F = tensors["features"]
            grams.append((f"layer {layer + 1} features", centred_gram(F[index.to(F.device)])))
        bar.set_postfix(nc1=f"{metrics['nc1_features']:.2e}", train_acc=f"{metrics['train_accuracy']:.3f}")
        bar.update(1)

    start = time.perf_counter()
    has_test = len(y_test) > 0
    model.fit(X_train, y_train, X_test if has_test else None, y_test if has_test else None, callback=callback)
    bar.close()
    seconds = time.perf_counter() - start
    result = {"projection": projection, "seconds": seconds, "metrics": model.metrics_,
              "readout_train_accuracy": model.score(X_train, y_train)}
    if has_test:
        result["readout_test_accuracy"] = model.score(X_test, y_test)
    return result, grams


def format_table(metrics: Sequence[dict]) -> str:
    """The per-layer table: one row per layer, the NC metrics at the three points, the accuracies and the seconds
    of the layer's solve, AGOP and feature map (the columns present in the first layer's metrics)."""
    cols = [c for c in COLUMNS if c[0] == "layer" or c[0] in metrics[0]]
    rows = [[fmt.format(i + 1 if key == "layer" else m[key]) for key, _, fmt in cols] for i, m in enumerate(metrics)]
    widths = [max(len(head), *(len(r[j]) for r in rows)) for j, (_, head, _) in enumerate(cols)]
    line = "  ".join(head.rjust(w) for (_, head, _), w in zip(cols, widths))
    body = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def _write_outputs(out: Path, config: dict, runs: list[dict]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"config": config, "runs": runs}, indent=2))
    keys = [c[0] for c in COLUMNS[1:]]
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["projection", "layer", *keys])
        for run in runs:
            for i, m in enumerate(run["metrics"]):
                writer.writerow([run["projection"], i + 1, *(m.get(k, "") for k in keys)])
    return [out / "metrics.json", out / "metrics.csv"]


def run_deep_rfm(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import train_test
    from .models import DeepRFM

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    data = train_test(args.dataset, args.n, args.n_test, seed=args.seed, preprocess=args.preprocess)
    X_train, y_train, X_test, _ = data
    K = len(np.unique(y_train))
    width = DeepRFM(feature_map=args.feature_map, width=args.width).layer_width(X_train.shape[1])
    print(f"dataset {args.dataset} ({args.preprocess}): {X_train.shape[0]} train / {X_test.shape[0]} test, "
          f"{X_train.shape[1]} features, {K} classes; depth {args.depth}, {args.kernel} L={args.bandwidth:g}, "
          f"reg={args.reg:g}, {args.feature_map} width {width}")
    make_plots = args.out is not None and not args.no_plots
    subset = None
    if make_plots:
        from .plots import gram_subset

        subset = gram_subset(y_train, args.gram_per_class, seed=args.seed)
    gram_layers = _gram_layers(args.depth)
    projections = [args.projection] + (["identity"] if args.control and args.projection != "identity" else [])
    runs, grams = [], {}
    for projection in projections:
        result, panels = _fit(args, projection, data, subset, gram_layers)
        runs.append(result)
        grams[projection] = panels
    for run in runs:
        label = "Deep RFM (AGOP projection)" if run["projection"] == "agop" else "control (identity projection)"
        accuracy = f"readout train acc {run['readout_train_accuracy']:.4f}"
        if "readout_test_accuracy" in run:
            accuracy += f", test acc {run['readout_test_accuracy']:.4f}"
        print(f"\n{label}: {run['seconds']:.1f} s, {accuracy}")
        print(format_table(run["metrics"]))
        first, last = run["metrics"][0]["nc1_input"], run["metrics"][-1]["nc1_features"]
        if last > 0 and first >= last:
            ratio = f" ({first / last:.1f}x lower)"
        elif last > 0:
            ratio = f" ({last / first:.1f}x higher)"
        else:
            ratio = ""
        print(f"NC1 layer-1 input -> layer-{len(run['metrics'])} features: {first:.3e} -> {last:.3e}{ratio}")
    if args.out is not None:
        config = {k: v for k, v in vars(args).items() if k != "func"}
        written = _write_outputs(Path(args.out), config, runs)
        if make_plots:
            from .plots import plot_collapse, plot_grams, short_name

            names = {"agop": "Deep RFM (AGOP projection)", "identity": "Control: identity projection (no AGOP)"}
            title = (f"{short_name(args.dataset)}: n={X_train.shape[0]}, {args.kernel} L={args.bandwidth:g}, "
                     f"{args.feature_map}")
            written.append(plot_collapse({names[r["projection"]]: r["metrics"] for r in runs},
                                         Path(args.out) / "collapse.png", title=title))
            sizes = np.bincount(y_train[subset])
            sizes = sizes[sizes > 0]
            rows = {("Deep RFM" if p == "agop" else "control"): panels for p, panels in grams.items()}
            written.append(plot_grams(rows, Path(args.out) / "gram.png", class_sizes=sizes,
                                      title="Centred, row-normalised Gram matrices (samples sorted by class)"))
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _selected_command(argv: Sequence[str]) -> Optional[str]:
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def _add_debug(parser: argparse.ArgumentParser, top: bool) -> None:
    # On the subcommands too (rfm-fast deep-rfm ... --debug); SUPPRESS there, so an absent flag does not reset
    # the top-level one.
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the Python traceback of an error instead of its one-line message")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; a delegated subcommand's module is imported only when ``argv`` selects it."""
    from . import __version__

    parser = Parser(prog="rfm-fast", description="Fast kernels for RFM and Deep RFM.")
    parser.add_argument("--version", action="version", version=f"rfm-fast {__version__}")
    _add_debug(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="{deep-rfm,bench,nn-collapse}")
    deep = subparsers.add_parser("deep-rfm", help="run Deep RFM and measure deep neural collapse per layer",
                                 description="Deep RFM (arXiv 2402.13728) with NC1/NC2 per layer, a table and plots.")
    add_deep_rfm_arguments(deep)
    _add_debug(deep, top=False)
    deep.set_defaults(func=run_deep_rfm)
    selected = _selected_command(argv)
    for name, (module_name, help_text) in DELEGATED.items():
        if name != selected:
            subparsers.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # Parsed leniently so any arguments reach the handler, which explains why the command is missing.
            reason = f"{type(exc).__name__}: {exc}"
            sub = subparsers.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
            sub.add_argument("rest", nargs="*")
            sub.set_defaults(func=lambda args, _n=name, _m=module_name, _r=reason: _unavailable(_n, _m, _r))
            continue
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        _add_debug(sub, top=False)
        sub.set_defaults(func=module.run)
    return parser


def _unavailable(name: str, module: str, reason: str) -> int:
    print(f"rfm-fast {name} is not available in this installation: {module} could not be imported ({reason})",
          file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"rfm-fast {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rfm-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
