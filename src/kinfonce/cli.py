"""The ``kinfonce`` command. Thin: each subcommand parses its flags, then calls a module.

Each subcommand lives in one ``_add_<name>`` function that registers its parser and sets
``func``; the heavy imports (Lightning, data, evaluation) happen inside the handlers, so that
``kinfonce --help`` costs only the import of torch that the package itself needs.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kinfonce",
        description="Contrastive self-supervised learning with Kernel-InfoNCE losses.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubcommandParser)
    sub.required = True
    for add in (_add_synthetic, _add_pretrain, _add_recipes, _add_eval, _add_report):
        add(sub)
    return parser


class _SubcommandParser(argparse.ArgumentParser):
    """Subcommand parsers show each flag's default in ``--help``."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)


def _add_synthetic(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "synthetic",
        help="the synthetic spectral-clustering experiment (Appendix C, Figure 3)",
        description="Train free 2-D embeddings of a stochastic block model's vertices with "
        "InfoNCE on positives sampled from its graph, until the smoothed loss stops improving; "
        "write a Figure-3-like PNG and metrics.json (k-means ARI/NMI against the true clusters "
        "and ARI against scikit-learn's spectral clustering of the graph).",
    )
    parser.add_argument("--p", type=float, default=1.0, help="within-cluster edge probability")
    parser.add_argument("--q", type=float, default=0.0, help="between-cluster edge probability")
    parser.add_argument("--clusters", type=int, default=6, help="number of clusters")
    parser.add_argument("--size", type=int, default=100, help="vertices per cluster")
    parser.add_argument(
        "--kernel",
        default="gaussian",
        help="loss preset: gaussian (the paper's), laplacian, exp-0.5, simple-sum, ...",
    )
    parser.add_argument("--tau", type=float, default=0.5, help="kernel temperature")
    parser.add_argument("--steps", type=int, default=10_000, help="maximum number of SGD steps")
    parser.add_argument(
        "--patience", type=int, default=1_000, help="stop after this many steps without progress"
    )
    parser.add_argument("--batch-size", type=int, default=50, help="anchor vertices per step")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    parser.add_argument("--sphere", action="store_true", help="train on the unit circle")
    parser.add_argument("--seed", type=int, default=0, help="seed of graph, init and sampling")
    parser.add_argument("--out", default="runs/synthetic", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run_synthetic)


def _run_synthetic(args: argparse.Namespace) -> int:
    from kinfonce.synthetic import SyntheticConfig, run_experiment

    config = SyntheticConfig(
        num_clusters=args.clusters,
        cluster_size=args.size,
        p=args.p,
        q=args.q,
        kernel=args.kernel,
        temperature=args.tau,
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.steps,
        patience=args.patience,
        sphere=args.sphere,
        seed=args.seed,
    )
    metrics = run_experiment(config, args.out, progress=not args.no_progress)
    print(
        f"ari_truth={metrics['ari_truth']:.4f} nmi_truth={metrics['nmi_truth']:.4f} "
        f"ari_spectral={metrics['ari_spectral']:.4f} steps={metrics['steps']} "
        f"wall_time_s={metrics['wall_time_s']:.1f}"
    )
    print(f"wrote {args.out}/synthetic.png and {args.out}/metrics.json")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    from kinfonce.config import add_config_flags

    parser = sub.add_parser(
        "pretrain",
        help="pretrain an encoder with a Kernel-InfoNCE loss (SimCLR or MoCo)",
        description="Pretrain an encoder with a Kernel-InfoNCE loss, then report its linear-probe "
        "and kNN accuracy beside a random-weight encoder and raw pixels. Without arguments: "
        "the embedded digits run (about 35 s on an idle 2-core CPU). Settings come from the defaults, "
        "then --recipe, then --config, then the flags below.",
    )
    parser.add_argument(
        "--recipe", metavar="NAME", help="start from a recipe of the paper (see `kinfonce recipes`)"
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of config fields")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective config as YAML, each value with its source, and exit",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="CKPT",
        help="continue the run in --output-dir from its newest checkpoint, or from CKPT",
    )
    add_config_flags(parser)
    parser.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from kinfonce.config import dump_config, flags_to_mapping
    from kinfonce.recipes import build_sourced_config

    config, sources = build_sourced_config(
        args.recipe, args.config, flags_to_mapping(args), resume=args.resume is not None
    )
    if args.print_config:
        print(dump_config(config.resolved(), sources), end="")
        return 0
    from kinfonce.report import format_summary
    from kinfonce.train import run_pretrain

    metrics = run_pretrain(config, resume=args.resume)
    if metrics:
        print(format_summary(metrics))
        print(f"run directory: {metrics['run_dir']}")
    return 0


def _add_recipes(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "recipes",
        help="list the recipes of the paper's experiments (Tables 1 and 4)",
        description="List the recipes that `kinfonce pretrain --recipe NAME` runs: one per cell "
        "of the paper's Table 1 (SimCLR) and per MoCo row of Table 4, at Appendix B's settings. "
        "`kinfonce pretrain --recipe NAME --print-config` shows every value with its source.",
    )
    parser.set_defaults(func=_run_recipes)


def _run_recipes(args: argparse.Namespace) -> int:
    from kinfonce.recipes import format_recipe_list

    print(format_recipe_list())
    print("\nshow one with: kinfonce pretrain --recipe NAME --print-config")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="evaluate a pretrained checkpoint: linear probe, kNN and a map of the features",
        description="Evaluate the frozen backbone of a `kinfonce pretrain` checkpoint with the "
        "linear probe of the paper's Appendix B and/or weighted kNN; print a table, write "
        "metrics.json and a 2-D map (t-SNE, or UMAP if installed) of the test features. "
        "Settings not given come from the checkpoint's config, so its own data set gives the "
        "figures that pretraining printed.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file from RUN_DIR/checkpoints")
    parser.add_argument("--dataset", help="data set name (default: the checkpoint's)")
    parser.add_argument("--data-root", help="directory or zip holding the data set")
    parser.add_argument(
        "--download",
        action="store_true",
        help="download a torchvision data set (cifar10, cifar100, stl10, tinyimagenet) "
        "that is not under --data-root",
    )
    parser.add_argument(
        "--protocol",
        choices=("linear", "knn", "both"),
        default="both",
        help="linear probe, weighted kNN, or both",
    )
    parser.add_argument(
        "--linear-epochs", type=int, help="linear-probe epochs (default: the run's, 100)"
    )
    parser.add_argument("--knn-k", type=int, help="kNN neighbours (default: the run's, 200)")
    parser.add_argument("--seed", type=int, help="linear-probe seed (default: the run's)")
    parser.add_argument(
        "--augment",
        action="store_true",
        help="train the linear head on crop/flip-augmented images with the encoder in the loop "
        "(slow) instead of on cached features",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    parser.add_argument(
        "--map-points", type=int, default=1000, help="test points in the feature map (0: no map)"
    )
    parser.add_argument(
        "--out", help="output directory (default: RUN_DIR/eval for RUN_DIR/checkpoints/X.ckpt)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kinfonce.evaluate import evaluate_checkpoint
    from kinfonce.report import format_eval_table, write_eval_outputs

    checkpoint = Path(args.checkpoint)
    metrics, splits = evaluate_checkpoint(
        checkpoint,
        dataset=args.dataset,
        data_root=args.data_root,
        download=args.download,
        protocol=args.protocol,
        linear_epochs=args.linear_epochs,
        knn_k=args.knn_k,
        seed=args.seed,
        augment=args.augment,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if args.out:
        out = Path(args.out)
    elif checkpoint.parent.name == "checkpoints":
        out = checkpoint.parent.parent / "eval"
    else:
        out = checkpoint.with_name(checkpoint.stem + "-eval")
    print(f"{checkpoint} on {metrics['dataset']} ({len(splits.test.labels)} test images)")
    print(format_eval_table(metrics))
    written = write_eval_outputs(
        metrics, splits, out, checkpoint=checkpoint, map_points=args.map_points
    )
    for path in written.values():
        print(f"wrote {path}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report",
        help="compare pretraining runs: a markdown table, training curves, accuracy per loss",
        description="Read run directories of `kinfonce pretrain`; print a markdown table "
        "(method, loss and parameters, backbone, data set, epochs, batch size, linear and kNN "
        "top-1, run time: wall_time_s of metrics.json) and write it with a PNG of the training "
        "curves side by side and one of the accuracy per loss (a dot per run, e.g. per seed, "
        "and each loss's mean ± sd).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--out",
        default="report",
        help="directory for report.md, curves.png and comparison.png (default: report)",
    )
    parser.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from kinfonce.report import write_report

    text, md_path, figures = write_report(args.run_dirs, args.out)
    print(text)
    print(f"wrote {md_path}, " + ", ".join(str(path) for path in figures))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from kinfonce.errors import KinfonceError

    try:
        return int(args.func(args) or 0)
    except KinfonceError as err:  # a user error: one line; any other exception keeps its traceback
        print(f"kinfonce {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
