"""An mkdocs hook: the command-line reference, generated from the argparse parser at build time.

``docs/reference/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it
with a section per command and subcommand (usage, description, arguments), read from
``wujie_async.cli.build_parser()``. Nothing is copied by hand, so the page cannot fall behind.
"""

from __future__ import annotations

import argparse
from typing import Any

MARKER = "<!-- cli-reference -->"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | what it does |", "| --- | --- |"]
    for action in parser._actions:  # argparse has no public walk of its tree
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += " " + (action.metavar or action.dest.upper())
        else:
            name = str(action.metavar or action.dest)
        help_text = (action.help or "").replace("%%", "%")
        if action.choices is not None and not isinstance(action.choices, dict):
            help_text += f" (one of: {', '.join(str(c) for c in action.choices)})"
        rows.append(f"| `{_escape(str(name))}` | {_escape(help_text)} |")
    return rows


def _section(parser: argparse.ArgumentParser, path: list[str], depth: int) -> list[str]:
    lines = [f"{'#' * depth} `{' '.join(path)}`", ""]
    usage = parser.format_usage().replace("usage: ", "").strip()
    lines += ["```text", usage, "```", ""]
    if parser.description:
        lines += ["```text", parser.description.strip(), "```", ""]
    rows = _argument_rows(parser)
    if len(rows) > 2:
        lines += [*rows, ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                lines += _section(sub, [*path, name], min(depth + 1, 4))
    return lines


def reference() -> str:
    """The whole command-line reference, as markdown."""
    from wujie_async.cli import build_parser

    return "\n".join(_section(build_parser(), ["wujie-async"], 2))


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """mkdocs hook: fill the marker with the generated reference."""
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
