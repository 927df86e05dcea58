"""The docs' code, checked against the code: a new user copies it as written.

The README's ten lines and the testing guide's example run in full elsewhere
(``test_examples.py``, ``test_testing_plugin.py``); here every Python block of the README and
the docs site parses, everything it imports from ``wujie_async`` exists, and every
``wujie-async`` command line in a shell block names a command and options the parser has.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from wujie_async.cli._completion import _commands, _walk
from wujie_async.cli._parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(*languages: str) -> list[tuple[str, str]]:
    """(where, code) of every fenced block in one of ``languages``, across the pages."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) in languages:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", match.group(2)))
    return found


PYTHON = blocks("python")
SHELL = blocks("sh", "bash", "console")


def test_the_docs_have_code_to_check() -> None:
    assert len(PYTHON) >= 15 and len(SHELL) >= 10, (len(PYTHON), len(SHELL))


@pytest.mark.parametrize(("where", "code"), PYTHON, ids=[where for where, _ in PYTHON])
def test_every_python_block_parses_and_imports_what_exists(where: str, code: str) -> None:
    # Snippets may await at top level (they stand for the body of an async function).
    tree = compile(code, where, "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    assert isinstance(tree, ast.Module)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wujie_async"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("wujie_async"):
                    importlib.import_module(alias.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "wujie_async"
        ):
            assert hasattr(importlib.import_module("wujie_async"), node.attr), (
                f"{where}: wujie_async.{node.attr}"
            )


# The parser's tree of commands and their options, as the shell completion walks it.
PARSER = {command.path: command for command in _commands(_walk(build_parser(), ()))}


def command_lines() -> list[tuple[str, list[str]]]:
    """(where, words after ``wujie-async``) of every command line in the shell blocks, also
    inside ``"$(...)"``; ``pip install wujie-async`` is not one."""
    found = []
    for where, code in SHELL:
        for line in code.replace("\\\n", " ").splitlines():
            found += [(where, words) for words in _commands_in(line)]
    return found


def _commands_in(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    found: list[list[str]] = []
    words: list[str] | None = None
    previous = ""
    for token in lexer:
        if "$(" in token:  # a command substitution, quoted or not
            found += _commands_in(token.split("$(", 1)[1].rsplit(")", 1)[0])
        if words is not None and token and set(token) <= set("();<>|&"):
            found.append(words)  # the command line ends at an operator
            words = None
        elif words is not None:
            words.append(token)
        elif token.rsplit("/", 1)[-1] == "wujie-async" and previous != "install":
            words = []
        previous = token
    if words is not None:
        found.append(words)
    return found


COMMANDS = command_lines()


def test_the_docs_show_command_lines() -> None:
    assert len(COMMANDS) >= 20, len(COMMANDS)


@pytest.mark.parametrize(
    ("where", "words"), COMMANDS, ids=[f"{w}:{' '.join(c[:2])}" for w, c in COMMANDS]
)
def test_every_command_line_names_what_the_parser_has(where: str, words: list[str]) -> None:
    command = PARSER[()]
    for word in words:  # the command, and its subcommand if it has some
        if not command.subcommands or word.startswith("-"):
            break
        names = [sub.path[-1] for sub in command.subcommands]
        assert word in names, f"{where}: no command {word!r} in {names}"
        command = PARSER[(*command.path, word)]
    for word in words:
        if word.startswith("-") and word != "-":  # "-" alone is stdin
            option = word.split("=", 1)[0]
            assert option in command.options, (
                f"{where}: {option} is not an option of {command.path}"
            )


# Options the pages name for other tools than wujie-async.
OTHER_TOOLS = {"--only", "--trickle"}  # benchmarks/schedule_probe.py, in the polling guide


def test_every_option_named_in_the_prose_exists() -> None:
    known = {option for command in PARSER.values() for option in command.options} | OTHER_TOOLS
    named = {
        (page.relative_to(ROOT).as_posix(), option)
        for page in PAGES
        for option in re.findall(r"`(--[a-z][a-z0-9-]*)", page.read_text(encoding="utf-8"))
    }
    assert len(named) >= 30, len(named)
    assert not {(page, option) for page, option in named if option not in known}


def test_the_exit_codes_of_the_guide_are_those_of_the_help() -> None:
    # `wujie-async --help` lists the exit codes a script checks; the guide's table is the
    # long form of the same list. The help's 3 once named only the systemic errors: a run
    # a full disk stopped (exit 3) found no word of it there.
    guide = (ROOT / "docs" / "guides" / "cli.md").read_text(encoding="utf-8")
    section = guide.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", section, re.MULTILINE))
    description = build_parser().description or ""
    helped = dict(re.findall(r"^  (\d+) +(.+(?:\n {7}.+)*)", description, re.MULTILINE))
    assert table.keys() == helped.keys() and len(table) >= 9, (table.keys(), helped.keys())
    for said in ("disk", "journal", "manifest", "status", "no submit"):
        assert said in table["3"] and said in " ".join(helped["3"].split()), said
