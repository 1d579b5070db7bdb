"""The ``kinfonce`` command. Thin: each subcommand parses its flags, then calls a module.

Every settings flag is generated from the fields of the command's settings dataclass
(:func:`kinfonce.config.add_flags`): one naming for all commands (``--output-dir``,
``--progress/--no-progress``), the help of each field, its default. What is left by hand is
what says what to run: positional arguments, ``--config``, ``--recipe``, ``--resume``,
``--print-config``. Each subcommand lives in one ``_add_<name>`` function that registers its
parser and sets ``func``; the heavy imports (Lightning, data, evaluation) happen inside the
handlers, so that ``kinfonce --help`` costs only the import of torch that the package needs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from kinfonce.config import (
    TRIAL_FIELDS,
    ClipConfig,
    EvalSettings,
    ExportSettings,
    PretrainConfig,
    ReportSettings,
    SearchRuntime,
    SearchSettings,
    SyntheticConfig,
    add_flags,
    given_flags,
    settings_from_flags,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kinfonce",
        description="Contrastive self-supervised learning with Kernel-InfoNCE losses.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (
        _add_synthetic,
        _add_pretrain,
        _add_recipes,
        _add_tune,
        _add_clip,
        _add_eval,
        _add_export,
        _add_report,
    ):
        add(sub)
    return parser


def _add_synthetic(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "synthetic",
        help="the synthetic spectral-clustering experiment (Appendix C, Figure 3)",
        description="Train free 2-D embeddings of a stochastic block model's vertices with "
        "InfoNCE on positives sampled from its graph, until the smoothed loss stops improving; "
        "write a Figure-3-like PNG and metrics.json (k-means ARI/NMI against the true clusters "
        "and ARI against scikit-learn's spectral clustering of the graph).",
    )
    add_flags(parser, SyntheticConfig)
    parser.set_defaults(func=_run_synthetic)


def _run_synthetic(args: argparse.Namespace) -> int:
    from kinfonce.fileio import check_writable_dir
    from kinfonce.resolve import check_synthetic
    from kinfonce.synthetic import run_experiment

    config = settings_from_flags(args, SyntheticConfig)
    check_synthetic(config)
    check_writable_dir(config.output_dir, "--output-dir")
    metrics = run_experiment(config)
    print(
        f"ari_truth={metrics['ari_truth']:.4f} nmi_truth={metrics['nmi_truth']:.4f} "
        f"ari_spectral={metrics['ari_spectral']:.4f} steps={metrics['steps']} "
        f"wall_time_s={metrics['wall_time_s']:.1f}"
    )
    print(f"wrote {config.output_dir}/synthetic.png and {config.output_dir}/metrics.json")
    return 0


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--print-config`` and ``--resume``: what pretrain and clip share."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of config fields")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML, each value with its source, and exit",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="CKPT",
        help="continue the run in --output-dir from its furthest readable checkpoint, or from CKPT",
    )


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "pretrain",
        help="pretrain an encoder with a Kernel-InfoNCE loss (SimCLR or MoCo)",
        description="Pretrain an encoder with a Kernel-InfoNCE loss, then report its linear-probe "
        "and kNN accuracy beside a random-weight encoder and raw pixels. Without arguments: "
        "the embedded digits run (about 20-35 s on an idle 2-core CPU). Settings come from the "
        "defaults, then --recipe, then --config, then the flags below; what is left open "
        "(none, auto) is decided once, and the resolved config is written to config.yaml.",
    )
    parser.add_argument(
        "--recipe", metavar="NAME", help="start from a recipe of the paper (see `kinfonce recipes`)"
    )
    _add_training_options(parser)
    add_flags(parser, PretrainConfig)
    parser.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from kinfonce.recipes import build_sourced_config

    config, sources = build_sourced_config(
        args.recipe,
        args.config,
        given_flags(args, PretrainConfig),
        resume=args.resume is not None,
    )
    if args.print_config:
        return _print_config(config, sources)
    from kinfonce.tables import format_summary
    from kinfonce.train import run_pretrain

    return _report_run(run_pretrain(config, resume=args.resume), format_summary)


def _print_config(config, sources: dict[str, str]) -> int:
    """Print the resolved config (checked like a run's), each value with its source."""
    from kinfonce.config import dump_config
    from kinfonce.resolve import check_machine, resolve_with_sources

    resolved, decided = resolve_with_sources(config)
    check_machine(resolved)
    sources = {**sources, **{k: f"resolved: {why}" for k, why in decided.items()}}
    print(dump_config(resolved, sources), end="")
    return 0


def _report_run(metrics: dict, format_summary) -> int:
    if metrics:  # empty on DDP ranks other than 0
        print(format_summary(metrics))
        print(f"run directory: {metrics['run_dir']}")
    return 0


def _add_tune(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tune",
        help="hyperparameter search with Ray Tune's ASHA scheduler",
        description="Random search over config fields with Ray Tune; ASHA stops poor trials "
        "early. Each trial is a `kinfonce pretrain` run (without the final evaluation) that "
        "reports its online-probe accuracy once per epoch. Without arguments: a small search "
        "on the embedded digits set. The default space for the loss preset: lr log-uniform in "
        "[0.01, 10] and lambda uniform in [0, 1] (Table 3), the preset's temperatures "
        "log-uniform in [0.01, 1] (the authors' code; Table 3 prints [0, 1]), a sum's gamma1 "
        "0.5 or 1 (the authors' code). Writes the best trials, the best config (for `kinfonce pretrain "
        "--config`) and a PNG of every trial's probe accuracy into the search directory. The "
        "search sets each trial's " + ", ".join(sorted(TRIAL_FIELDS)) + " itself.",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of config fields (all trials)")
    parser.add_argument(
        "--space",
        metavar="YAML",
        help="search space file; without it, the default space for the loss (Table 3's, with "
        "the authors' code's temperature range and the sums' gamma1)",
    )
    parser.add_argument(
        "--budget",
        metavar="NAME",
        help="start the search settings from a published budget: paper (500 samples, Appendix "
        "B) or authors-code (100 samples, grace period 20, max_t 200); flags override it",
    )
    parser.add_argument(
        "--resume", metavar="DIR", help="continue the interrupted search in DIR with its settings"
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: also resume failed trials from their last checkpoint",
    )
    add_flags(parser, SearchSettings)
    add_flags(parser, SearchRuntime)
    add_flags(parser, PretrainConfig, exclude=TRIAL_FIELDS)
    parser.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from kinfonce.config import build_config, dump_config
    from kinfonce.errors import KinfonceError
    from kinfonce.space import budget_settings, default_space, load_space
    from kinfonce.tables import search_summary
    from kinfonce.tune import default_search_dir, resume_search, run_search

    settings = given_flags(args, SearchSettings)
    fields = given_flags(args, PretrainConfig)
    runtime = settings_from_flags(args, SearchRuntime)
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in (*settings, *fields)]
        given += [f"--{k}" for k in ("config", "space", "budget") if getattr(args, k)]
        given += ["--output-dir"] if runtime.output_dir else []
        if given:
            raise KinfonceError(
                f"--resume continues a search with its own settings; drop {', '.join(given)}"
            )
        result = resume_search(
            args.resume,
            address=runtime.address,
            num_cpus=runtime.num_cpus,
            retry_failed=args.retry_failed,
        )
        search_dir = args.resume
    else:
        if args.retry_failed:
            raise KinfonceError("--retry-failed goes with --resume DIR")
        search = budget_settings(args.budget, settings)
        base = build_config(args.config, fields)
        space = load_space(args.space) if args.space else default_space(base.loss)
        search_dir = runtime.output_dir or default_search_dir(base)
        result = run_search(
            base, space, search, search_dir, address=runtime.address, num_cpus=runtime.num_cpus
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
    parser = sub.add_parser(
        "clip",
        help="train an image encoder against captions with the bipartite (CLIP) loss",
        description="Train an image encoder and a text encoder on image-caption pairs with the "
        "bipartite Kernel-InfoNCE loss (any kernel preset). Captions are class-name prompts; "
        "--rewrites K gives each class K captions (the prompt and K-1 rewrites), one drawn "
        "per image and step. Reports zero-shot accuracy (nearest class prompt under the "
        "training kernel) beside the linear probe of the same image encoder. Settings come "
        "from the defaults, then --config, then the flags below; the resolved config is "
        "written to config.yaml.",
    )
    _add_training_options(parser)
    parser.add_argument(
        "--report-graph",
        action="store_true",
        help="print the size, degrees and connected components of the training pair graph "
        "without and with the rewrites, and exit",
    )
    add_flags(parser, ClipConfig)
    parser.set_defaults(func=_run_clip)


def _run_clip(args: argparse.Namespace) -> int:
    from kinfonce.config import build_config, config_file_for, read_config_mapping

    flags = given_flags(args, ClipConfig)
    resume = args.resume is not None
    config = build_config(args.config, flags, resume=resume, cls=ClipConfig)
    if args.print_config:
        path = config_file_for(args.config, flags, resume=resume)
        sources = dict.fromkeys(read_config_mapping(path), f"--config {path}") if path else {}
        return _print_config(config, {**sources, **dict.fromkeys(flags, "command line")})
    from kinfonce.clip import pair_graph_report, run_clip
    from kinfonce.tables import format_summary

    if args.report_graph:
        print(pair_graph_report(config))
        return 0
    return _report_run(run_clip(config, resume=args.resume), format_summary)


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
        description="Evaluate the frozen backbone of a `kinfonce pretrain` or `clip` checkpoint "
        "with the linear probe of the paper's Appendix B and/or weighted kNN; print a table, "
        "write metrics.json and a 2-D map (t-SNE, or UMAP if installed) of the test features. "
        "Settings not given come from the checkpoint's config, and the backbone runs in the "
        "memory format and on the kind of device of its run, so its own data set gives the "
        "figures that the run printed.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file from RUN_DIR/checkpoints")
    add_flags(parser, EvalSettings)
    parser.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from kinfonce.evaluate import evaluate_checkpoint, write_eval_outputs
    from kinfonce.fileio import check_writable_dir
    from kinfonce.tables import format_eval_table

    settings = settings_from_flags(args, EvalSettings)
    checkpoint = Path(args.checkpoint)
    if settings.output_dir:
        out = Path(settings.output_dir)
    elif checkpoint.parent.name == "checkpoints":
        out = checkpoint.parent.parent / "eval"
    else:
        out = checkpoint.with_name(checkpoint.stem + "-eval")
    check_writable_dir(out, "--output-dir")
    metrics, splits = evaluate_checkpoint(checkpoint, settings)
    print(
        f"{checkpoint} on {metrics['dataset']} ({len(splits.test.labels)} test images), "
        f"on {metrics['device']} ({metrics['device_reason']})"
    )
    print(format_eval_table(metrics))
    written = write_eval_outputs(
        metrics, splits, out, checkpoint=checkpoint, map_points=settings.map_points
    )
    for path in written.values():
        print(f"wrote {path}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a checkpoint's encoder for use without kinfonce (safetensors, torchscript, "
        "torch-export, onnx, torchvision)",
        description="Write the backbone of a `kinfonce pretrain` or `clip` run (its "
        "checkpoints/last.ckpt) or of a checkpoint, and with --head its projection head, in a "
        "format other programs load without kinfonce, with a config.json naming the "
        "architecture, stem, feature width, input size and normalisation. The export is loaded "
        "back and its features compared with the checkpoint's on a batch (the largest relative "
        "difference is printed); an export that does not reproduce them is not written.",
    )
    parser.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="run directory or .ckpt")
    add_flags(parser, ExportSettings)
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from kinfonce.export import export_encoder

    output, description = export_encoder(args.source, settings_from_flags(args, ExportSettings))
    check = description["check"]
    for part, difference in check["max_relative_difference"].items():
        print(
            f"{part}: largest relative difference to the checkpoint {difference:.2e} on "
            f"{check['images']} images (tolerance {check['tolerance']:g})"
        )
    for name in (*description["files"].values(), "config.json"):
        print(f"wrote {output / name}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report",
        help="compare runs: a markdown table, training curves, accuracy per loss",
        description="Read run directories of `kinfonce pretrain` or `clip`; print a markdown "
        "table (method, loss and parameters, backbone, data set, epochs, batch size, linear "
        "and kNN top-1, run time: wall_time_s of metrics.json) and write it with a PNG of the "
        "training curves side by side and one of the accuracy per loss (a dot per run, e.g. "
        "per seed, and each loss's mean ± sd).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    add_flags(parser, ReportSettings)
    parser.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from kinfonce.fileio import check_writable_dir
    from kinfonce.runs import report_dir, write_report

    settings = settings_from_flags(args, ReportSettings)
    check_writable_dir(report_dir(args.run_dirs, settings), "--output-dir")
    text, md_path, figures = write_report(args.run_dirs, settings)
    print(text)
    print(f"wrote {md_path}, " + ", ".join(str(path) for path in figures))
    return 0


def _warning_line(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints one line, ``kinfonce COMMAND: warning: ...``,
    without the source line Python would show (a user acts on the message, not on kinfonce's
    code)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"kinfonce {command}: warning: {message}", file=file or sys.stderr)

    return show


#: Exit status after SIGINT (Ctrl-C) and SIGTERM: 128 + the signal's number, as a shell
#: reports a process the signal ended; never 0, so a scheduler does not count the job done.
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from kinfonce.errors import KinfonceError, Terminated
    from kinfonce.fileio import UNWRITABLE
    from kinfonce.scoped import sigterm_raises

    def fail(message: str) -> int:
        print(f"kinfonce {args.command}: {message}", file=sys.stderr)
        return 2

    try:
        with warnings.catch_warnings(), sigterm_raises():
            warnings.showwarning = _warning_line(args.command)
            return int(args.func(args) or 0)
    except KinfonceError as err:  # a user error: one line; any other exception keeps its traceback
        return fail(f"error: {err}")
    except OSError as err:  # a disk that cannot take a write is the user's to fix, too
        if err.errno not in UNWRITABLE:
            raise
        where = f" {str(err.filename)!r}" if err.filename else ""
        return fail(f"error: cannot write{where}: {err.strerror}")
    except KeyboardInterrupt:  # Ctrl-C: what was saved is said where it happened
        fail("interrupted")
        return EXIT_SIGINT
    except Terminated:  # SIGTERM, as a scheduler sends it
        fail("terminated (SIGTERM)")
        return EXIT_SIGTERM


if __name__ == "__main__":
    raise SystemExit(main())
