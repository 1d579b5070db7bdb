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
    for add in (
        _add_synthetic,
        _add_pretrain,
        _add_recipes,
        _add_tune,
        _add_clip,
        _add_eval,
        _add_report,
    ):
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
    from kinfonce.fileio import check_writable_dir
    from kinfonce.synthetic import SyntheticConfig, run_experiment

    check_writable_dir(args.out, "--out")
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
        "the embedded digits run (about 20-25 s on an idle 2-core CPU). Settings come from the defaults, "
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
        help="continue the run in --output-dir from its furthest readable checkpoint, or from CKPT",
    )
    add_config_flags(parser)
    parser.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from kinfonce.config import dump_config, flags_to_mapping, validate
    from kinfonce.recipes import build_sourced_config

    config, sources = build_sourced_config(
        args.recipe, args.config, flags_to_mapping(args), resume=args.resume is not None
    )
    if args.print_config:  # checked like a run, so that a bad name is not printed as valid
        print(dump_config(validate(config), sources), end="")
        return 0
    from kinfonce.report import format_summary
    from kinfonce.train import run_pretrain

    metrics = run_pretrain(config, resume=args.resume)
    if metrics:
        print(format_summary(metrics))
        print(f"run directory: {metrics['run_dir']}")
    return 0


#: ``kinfonce tune`` flags of :class:`kinfonce.tune.SearchSettings` (argparse type, help).
_SEARCH_FLAGS = {
    "num_samples": (int, "trials to draw, per combination of grid values (default: 8)"),
    "max_t": (int, "epochs of a trial ASHA does not stop (default: the config's epochs, 15)"),
    "grace_period": (int, "epochs before ASHA may stop a trial (default: 1)"),
    "reduction_factor": (float, "ASHA keeps the best 1/F of the trials at each rung (default: 2)"),
    "cpus_per_trial": (float, "CPUs per trial (default: 1)"),
    "gpus_per_trial": (float, "GPUs per trial; a fraction such as 0.25 shares a GPU (default: 0)"),
    "max_concurrent": (int, "at most this many trials at once (default: as resources allow)"),
    "max_failures": (int, "retries of a failed trial from its last checkpoint (default: 0)"),
    "search_seed": (int, "seed of the sampled values (default: 0)"),
}
#: Config fields that the search sets itself (epochs: --max-t; output: the search directory).
_TUNE_FIXED = frozenset(
    {"output_dir", "epochs", "progress", "accelerator", "devices", "num_nodes", "strategy"}
)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from kinfonce.config import add_config_flags

    parser = sub.add_parser(
        "tune",
        help="hyperparameter search with Ray Tune's ASHA scheduler",
        description="Random search over config fields with Ray Tune; ASHA stops poor trials "
        "early. Each trial is a `kinfonce pretrain` run (without the final evaluation) that "
        "reports its online-probe accuracy once per epoch. Without arguments: a small search "
        "on the embedded digits set. The default space is Table 3's for the loss preset: lr "
        "log-uniform in [0.01, 10], the preset's temperatures log-uniform in [0.01, 1], lambda "
        "uniform in [0, 1]. Writes the best trials, the best config (for `kinfonce pretrain "
        "--config`) and a PNG of every trial's probe accuracy into the search directory.",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of config fields (all trials)")
    parser.add_argument(
        "--space", metavar="YAML", help="search space file; without it, Table 3's for the loss"
    )
    group = parser.add_argument_group("search settings")
    for name, (kind, text) in _SEARCH_FLAGS.items():  # absent unless given, as config flags
        group.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, help=text
        )
    group = parser.add_argument_group("where it runs")
    group.add_argument(
        "--output-dir",
        dest="search_dir",
        metavar="DIR",
        help="search directory; without it, runs/tune/<dataset>-<method>-<loss>-<time>",
    )
    group.add_argument("--resume", metavar="DIR", help="continue the interrupted search in DIR")
    group.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: also resume failed trials from their last checkpoint",
    )
    group.add_argument("--address", help="join this Ray cluster; without it, Ray starts here")
    group.add_argument("--num-cpus", type=int, help="CPUs of the Ray started here; without it, all")
    add_config_flags(parser, exclude=_TUNE_FIXED)
    parser.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from kinfonce.config import build_config, dump_config, flags_to_mapping
    from kinfonce.errors import KinfonceError
    from kinfonce.report import search_summary
    from kinfonce.space import default_space, load_space
    from kinfonce.tune import SearchSettings, default_search_dir, resume_search, run_search

    settings = {k: getattr(args, k) for k in _SEARCH_FLAGS if hasattr(args, k)}
    fields = flags_to_mapping(args)
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in (*settings, *fields)]
        given += [f"--{k}" for k in ("config", "space") if getattr(args, k)]
        given += ["--output-dir"] if args.search_dir else []
        if given:
            raise KinfonceError(
                f"--resume continues a search with its own settings; drop {', '.join(given)}"
            )
        result = resume_search(
            args.resume,
            address=args.address,
            num_cpus=args.num_cpus,
            retry_failed=args.retry_failed,
        )
        search_dir = args.resume
    else:
        if args.retry_failed:
            raise KinfonceError("--retry-failed goes with --resume DIR")
        base = build_config(args.config, fields)
        space = load_space(args.space) if args.space else default_space(base.loss)
        settings.setdefault("max_t", base.epochs)
        search_dir = args.search_dir or default_search_dir(base)
        result = run_search(
            base,
            space,
            SearchSettings(**settings),
            search_dir,
            address=args.address,
            num_cpus=args.num_cpus,
        )
    print(search_summary(result.trials, result.keys))
    if result.best_config is not None:
        print(f"best config ({result.files['best_config']}):")
        print(dump_config(result.best_config), end="")
    for name in ("summary", "trials", "curves"):
        print(f"wrote {result.files[name]}")
    if result.interrupted:
        print(f"interrupted; continue with: kinfonce tune --resume {search_dir}", file=sys.stderr)
        return 130
    return 0 if result.best_config is not None else 1


def _add_clip(sub: argparse._SubParsersAction) -> None:
    from kinfonce.config import ClipConfig, add_config_flags

    parser = sub.add_parser(
        "clip",
        help="train an image encoder against captions with the bipartite (CLIP) loss",
        description="Train an image encoder and a text encoder on image-caption pairs with the "
        "bipartite Kernel-InfoNCE loss (any kernel preset). Captions are class-name prompts; "
        "--rewrites K gives each class K captions (the prompt and K-1 rewrites), one drawn "
        "per image and step. Reports zero-shot accuracy (nearest class prompt under the "
        "training kernel) beside the linear probe of the same image encoder. Settings come "
        "from the defaults, then --config, then the flags below.",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of config fields")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective config as YAML and exit"
    )
    parser.add_argument(
        "--report-graph",
        action="store_true",
        help="print the size, degrees and connected components of the training pair graph "
        "without and with the rewrites, and exit",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="CKPT",
        help="continue the run in --output-dir from its furthest readable checkpoint, or from CKPT",
    )
    add_config_flags(parser, ClipConfig)
    parser.set_defaults(func=_run_clip)


def _run_clip(args: argparse.Namespace) -> int:
    from kinfonce.config import ClipConfig, build_config, dump_config, flags_to_mapping

    config = build_config(
        args.config,
        flags_to_mapping(args, ClipConfig),
        resume=args.resume is not None,
        cls=ClipConfig,
    )
    if args.print_config:
        print(dump_config(config.resolved()), end="")
        return 0
    from kinfonce.clip import format_clip_summary, pair_graph_report, run_clip

    if args.report_graph:
        print(pair_graph_report(config))
        return 0
    metrics = run_clip(config, resume=args.resume)
    if metrics:
        print(format_clip_summary(metrics))
        print(f"run directory: {metrics['run_dir']}")


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
    from kinfonce.fileio import check_writable_dir
    from kinfonce.report import format_eval_table, write_eval_outputs

    checkpoint = Path(args.checkpoint)
    if args.out:
        out = Path(args.out)
    elif checkpoint.parent.name == "checkpoints":
        out = checkpoint.parent.parent / "eval"
    else:
        out = checkpoint.with_name(checkpoint.stem + "-eval")
    check_writable_dir(out, "--out")
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
    from kinfonce.fileio import check_writable_dir
    from kinfonce.report import write_report

    check_writable_dir(args.out, "--out")
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
    except KeyboardInterrupt:  # Ctrl-C: what was saved is said where it happened
        print(f"kinfonce {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
