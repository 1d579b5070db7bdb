"""The flag reference of every ``kinfonce`` command, generated from the parsers themselves.

``docs/flags.md`` is this module's output (``python -m kinfonce.flagdoc > docs/flags.md``); a
test compares the two, so the reference cannot drift from the code, and fails on any flag
without a help text.
"""

from __future__ import annotations

import argparse

from kinfonce.cli import build_parser

HEADER = (
    "# Flag reference\n\n"
    "Generated from the command-line parsers by `python -m kinfonce.flagdoc > docs/flags.md`;\n"
    "a test fails when this file and the code disagree. `kinfonce COMMAND --help` prints the\n"
    "same. Every `kinfonce pretrain` and `kinfonce clip` flag is also a key of its YAML config\n"
    "(`--config FILE`), with dashes written as underscores.\n"
)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Name -> parser of each subcommand of ``parser``, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flag_names(action: argparse.Action) -> str:
    names = action.option_strings or [action.metavar or action.dest]
    return ", ".join(f"`{name}`" for name in names)


def _help_text(action: argparse.Action) -> str:
    text = " ".join((action.help or "").split())
    default = action.default
    shown = all(default is not hidden for hidden in (None, argparse.SUPPRESS, False))
    shown = shown and "%(default)" not in text
    text = text.replace("%(default)s", str(default))
    if shown and "(default" not in text:
        text += f" (default: {default})"
    return text.replace("|", "/")


def undocumented_flags(parser: argparse.ArgumentParser) -> list[str]:
    """``"command --flag"`` for every flag of every subcommand that has no help text."""
    return [
        f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
        for name, sub in subcommands(parser).items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]


def flag_reference(parser: argparse.ArgumentParser) -> str:
    """Markdown: one section per subcommand with its description and a table of its flags."""
    parts = [HEADER]
    for name, sub in subcommands(parser).items():
        parts.append(f"\n## `kinfonce {name}`\n\n{' '.join((sub.description or '').split())}\n")
        actions = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            parts.append("\nNo flags.\n")
            continue
        parts.append("\n| flag | meaning |\n|---|---|\n")
        for action in actions:
            parts.append(f"| {_flag_names(action)} | {_help_text(action)} |\n")
    return "".join(parts)


if __name__ == "__main__":
    print(flag_reference(build_parser()), end="")
