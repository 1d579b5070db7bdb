"""The documentation cannot drift from the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kinfonce.cli import build_parser
from kinfonce.config import (
    ClipConfig,
    EvalSettings,
    ExportSettings,
    PretrainConfig,
    ReportSettings,
    SyntheticConfig,
    build_config,
    given_flags,
    settings_from_flags,
)
from kinfonce.flagdoc import flag_reference, undocumented_flags
from kinfonce.recipes import build_sourced_config
from kinfonce.resolve import check_synthetic, resolve
from tests.helpers import tiny_flags

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_flag_has_a_help_text():
    # Catches a new flag or config field added without documentation.
    assert undocumented_flags(build_parser()) == []


def test_flag_reference_is_generated_from_the_parsers():
    # Catches docs/flags.md left behind when a flag, default or help text changes.
    assert (DOCS / "flags.md").read_text() == flag_reference(build_parser()), (
        "docs/flags.md is stale: regenerate it with `python -m kinfonce.flagdoc > docs/flags.md`"
    )


ROOT = DOCS.parent
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    """The fenced ```python blocks of a markdown page, in order."""
    blocks, current = [], None
    for line in page.read_text().splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


#: The start of a command line that runs kinfonce: directly, after the variables of a
#: multi-node launch, or through a launcher (``torchrun ... -m kinfonce.cli``, ``srun ...
#: kinfonce``), whose words before kinfonce's are then left out.
KINFONCE_LINE = re.compile(r"^((MASTER_ADDR|MASTER_PORT|NODE_RANK)=\S+ )*(kinfonce|torchrun|srun) ")


def shell_commands(page: Path) -> list[str]:
    """The command lines that run ``kinfonce`` in a page's indented and fenced blocks, with
    their backslash continuations joined and trailing ``# comments`` removed."""
    commands, pending = [], ""
    for line in page.read_text().splitlines():
        text = line.strip()
        if pending:
            text = pending + " " + text
        elif not (line.startswith("    ") and KINFONCE_LINE.match(text)):
            continue
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        commands.append(text.split("  #")[0].split(" # ")[0].strip())
    return commands


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real, tiny `kinfonce pretrain` run: what the examples call RUN and RUN_DIR, with the
    exports of docs/guide.md in RUN/export-FORMAT."""
    from kinfonce.cli import main

    run = tmp_path_factory.mktemp("docs") / "RUN"
    flags = tiny_flags(train_subset=64, eval_linear_epochs=1)
    assert main(["pretrain", *flags, "--output-dir", str(run)]) == 0
    for fmt in ("safetensors", "torch-export", "torchscript", "onnx"):
        assert main(["export", str(run), "--format", fmt, "--head"]) == 0
    return run


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch, tiny_run):
    # Catches an example that no longer runs: a renamed function, a changed signature, an
    # undefined name. The blocks of one page run in order in one namespace, in a scratch folder
    # where RUN and RUN_DIR are a real run directory.
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    for name in ("RUN", "RUN_DIR"):
        (tmp_path / name).symlink_to(tiny_run, target_is_directory=True)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, f"{page.name}", "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_shell_commands_parse(page, capsys):
    # Catches a documented command whose subcommand, flag or choice no longer exists, or
    # whose flags build no valid settings. Commands are parsed, not run (they train for
    # minutes to days); their settings are built and checked (a training config resolved).
    commands = shell_commands(page)
    if not commands:
        pytest.skip(f"{page.name} has no kinfonce commands")
    parser = build_parser()
    for command in commands:
        words = shlex.split(command)
        start = next(i for i, word in enumerate(words) if word in ("kinfonce", "kinfonce.cli"))
        cut = [i for i, word in enumerate(words) if word in (">", "|", "&&", ";")]
        argv = words[start + 1 : cut[0] if cut else None]
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:
            raise AssertionError(f"{page.name}: `{command}` does not parse") from exit_
        resume = getattr(args, "resume", None) is not None
        if args.command == "pretrain" and not args.config:
            mapping = given_flags(args, PretrainConfig)
            resolve(build_sourced_config(args.recipe, None, mapping, resume=resume)[0])
        if args.command == "clip" and not args.config:
            resolve(
                build_config(None, given_flags(args, ClipConfig), resume=resume, cls=ClipConfig)
            )
        if args.command == "synthetic":
            check_synthetic(settings_from_flags(args, SyntheticConfig))
        for command, settings in (
            ("eval", EvalSettings),
            ("report", ReportSettings),
            ("export", ExportSettings),
        ):
            if args.command == command:
                settings_from_flags(args, settings)


def guide_preset_rows() -> dict[str, list[str]]:
    """Preset name -> the cells (preset, definition, parameters) of the guide's preset table."""
    rows = {}
    for line in (DOCS / "guide.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and line.startswith("| `"):
            for name in re.findall(r"`([a-z0-9.-]+)`", cells[0]):
                rows[name] = cells
    return rows


def test_guide_lists_every_preset_with_its_defaults_and_learning_rate():
    # Catches the guide's preset table drifting from the presets' defaults or learning rates.
    from kinfonce.losses import LOSS_PRESETS, preset_defaults

    rows = guide_preset_rows()
    assert set(LOSS_PRESETS) <= set(rows)
    for name in LOSS_PRESETS:
        for key, value in preset_defaults(name).items():
            assert f"`{key}` {value}" in rows[name][2], (name, key)
    assert f"peak learning rate, {PretrainConfig().lr}" in (DOCS / "guide.md").read_text()


#: Distinct values given to a preset's parameters, so that each kernel term of the built loss
#: shows which parameter its gamma, temperature and weight came from.
MARKERS = {"temperature": 0.11, "temperature1": 0.12, "temperature2": 0.13, "gamma": 1.5}
MARKERS.update(lam=0.3, gamma1=0.75)


def preset_definition(name: str) -> str | None:
    """The guide's definition of a preset, written from the loss it builds: each kernel term
    with its weight, gamma, temperature and half; None for a loss without a kernel."""
    from kinfonce.losses import LossMixture, make_loss, preset_defaults

    params = {k: v for k, v in MARKERS.items() if k in preset_defaults(name)}
    loss = make_loss(name, **params)
    if not hasattr(loss, "kernel"):
        return None
    named = {value: f"`{key}`" for key, value in params.items()}
    letter = "L" if isinstance(loss, LossMixture) else "K"
    weights = {1.0: ""}
    if "lam" in params:
        weights = {params["lam"]: "`lam` · ", 1 - params["lam"]: "(1 - `lam`) · "}
    halves = ("first", "second")
    terms = []
    for term in loss.kernel.terms:
        gamma = named.get(term.kernel.gamma, f"gamma {term.kernel.gamma:g}")
        text = f"{weights[term.weight]}{letter}({gamma}, {named[term.kernel.temperature]})"
        if loss.kernel.parts == 2:
            text += f" on the {halves[term.part]} half"
        terms.append(text)
    return " + ".join(terms)


def test_guide_defines_each_preset_as_the_code_builds_it():
    # Catches the guide describing a preset otherwise than the loss it builds: which term lam
    # weighs, which temperature belongs to which kernel, which half a term sees (the guide
    # once said lam weighs the Gaussian term with temperature1, the reverse of the code).
    from kinfonce.losses import LOSS_PRESETS

    rows = guide_preset_rows()
    for name in LOSS_PRESETS:
        expected = preset_definition(name)
        if expected is not None:
            assert rows[name][1] == expected, name


def test_a_command_without_flags_says_so():
    # Catches the empty flag table that `kinfonce recipes` had in docs/flags.md.
    text = flag_reference(build_parser())
    section = text[text.index("## `kinfonce recipes`") :].split("\n## ")[0]
    assert "No flags." in section and "| flag |" not in section


def test_multi_node_launchers_are_documented_and_parsed():
    # Catches the multi-node section losing a launcher, or its commands leaving the parse
    # check above (the launcher's words before `kinfonce` must not hide them).
    commands = shell_commands(DOCS / "pretrain.md")
    for launcher in ("MASTER_ADDR=", "torchrun ", "srun "):
        assert any(c.startswith(launcher) and "--num-nodes 2" in c for c in commands), launcher
