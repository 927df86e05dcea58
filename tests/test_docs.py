"""The docs' code, checked against the code: a new user copies it as written.

The README's ten lines and the testing guide's example run in full elsewhere
(``test_examples.py``, ``test_testing_plugin.py``); here every Python block of the README and
the docs site parses, everything it imports from ``wujie_async`` exists, every
``wujie-async`` command line in a shell block names a command and options the parser has, and
the snippets of the guides a new user reads first run, as written, against an emulator.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import re
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from wujie_async.cli._completion import _commands, _walk
from wujie_async.cli._parser import build_parser
from wujie_async.emulator import Emulator

from .conftest import EmulatorFactory, make_client

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


# --- The guides' code, run as a user pastes it -----------------------------------------------
#
# Parsing catches a misspelt import, not a snippet that uses a name it never imports or an
# attribute the code does not have. These run each snippet a new user reads first, as written,
# against an emulator: the credentials in the environment, as the emulator's `--background`
# sets them, for the snippets that make their own `WujieClient()`; an open client and a job
# of two images as `client` and `job` for the fragments that stand in a program's body.


def snippet(page: str, containing: str) -> tuple[str, str]:
    """(where, code) of the one Python block of ``page`` that contains ``containing``."""
    [found] = [(w, code) for w, code in PYTHON if w.startswith(f"{page}:") and containing in code]
    return found


async def run_snippet(where: str, code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Runs a snippet in ``namespace`` (and returns it): on this loop when it awaits at top
    level, on a thread of its own when it runs its own loop (``asyncio.run``)."""
    compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if "asyncio.run(" in code:
        await anyio.to_thread.run_sync(functools.partial(exec, compiled, namespace))
    else:
        result = eval(compiled, namespace)  # a coroutine when the snippet awaits
        if inspect.iscoroutine(result):
            await result
    return namespace


@pytest.fixture
async def gateway(
    emulator: EmulatorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Emulator]:
    """An emulator, its credentials in the environment, and a fresh working folder."""
    async with emulator() as emu:
        monkeypatch.setenv("WUJIE_APP_ID", emu.credentials.app_id)
        monkeypatch.setenv("WUJIE_PRIVATE_KEY", emu.credentials.private_key)
        monkeypatch.setenv("WUJIE_BASE_URL", emu.base_url)
        monkeypatch.delenv("WUJIE_PRIVATE_KEY_FILE", raising=False)
        monkeypatch.chdir(tmp_path)
        yield emu


# (page, a phrase of the snippet): snippets that make their own client from the environment.
# A default client first asks about a job 1 s after its submit: a snippet that waits for one
# takes about a second.
ON_THEIR_OWN = [
    pytest.param("docs/index.md", "Emulator(EmulatorConfig(", id="index: in-process"),
    pytest.param(
        "docs/guides/saving.md", "in await job.save(", id="saving", marks=pytest.mark.long
    ),
    pytest.param("docs/guides/saving.md", "DownloadPolicy(deadline=", id="saving: policy"),
    pytest.param("docs/guides/saving.md", "allow_private_addresses=", id="saving: private"),
    pytest.param("docs/guides/points.md", "Limits(max_points=", id="points: budget"),
    pytest.param("docs/guides/emulator.md", "estimate_basis=", id="emulator: config"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("page", "containing"), ON_THEIR_OWN)
async def test_a_snippet_on_its_own_runs_as_written(
    gateway: Emulator, page: str, containing: str
) -> None:
    await run_snippet(*snippet(page, containing), {"__name__": "__main__"})


@pytest.mark.long
@pytest.mark.anyio
async def test_the_getting_started_ten_lines_save_every_image(
    gateway: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_snippet(*snippet("docs/index.md", "await job.save("), {"__name__": "__main__"})
    key, first_url, *paths = capsys.readouterr().out.split()
    assert first_url.startswith(gateway.base_url.split("/wj-open/")[0])
    assert len(list((tmp_path / "out").glob(f"{key}-*.png"))) == len(paths) == 4


@pytest.mark.long
@pytest.mark.anyio
async def test_the_emulator_guide_reads_the_credentials_file_back(
    gateway: Emulator, tmp_path: Path
) -> None:
    credentials = gateway.credentials
    (tmp_path / "creds.json").write_text(
        json.dumps(
            {
                "app_id": credentials.app_id,
                "private_key": credentials.private_key,
                "base_url": gateway.base_url,
            }
        )
    )
    found = await run_snippet(*snippet("docs/guides/emulator.md", 'open("creds.json")'), {})
    async with found["client"] as client:
        result = await client.images.generate(prompt="a fox", model="dall-e-2")
    assert len(result.images) == 1


# Fragments that stand in a program's body, run with an open client and a job of two images.
WITH_A_JOB = [
    pytest.param("docs/guides/saving.md", "client.download(image", id="saving: one image"),
    pytest.param("docs/guides/progress.md", "update.status_name", id="progress"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("page", "containing"), WITH_A_JOB)
async def test_a_fragment_runs_with_a_client_and_a_job(
    gateway: Emulator, page: str, containing: str
) -> None:
    async with make_client(gateway) as client:
        job = await client.images.submit(prompt="a lighthouse", model="gpt-image-1", n=2)
        await run_snippet(*snippet(page, containing), {"client": client, "job": job})
        await job


@pytest.mark.long
@pytest.mark.anyio
async def test_the_library_guide_web_app_answers_with_the_images(gateway: Emulator) -> None:
    """The guide's app, served as `web.run_app` serves it, on real sockets."""
    found = await run_snippet(*snippet("docs/guides/library.md", "web.AppKey"), {"__name__": "app"})
    runner = web.AppRunner(found["app"])
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{port}/images") as reply,
        ):
            assert reply.status == 200, await reply.text()
            answer = await reply.json()
        assert len(answer["key"]) == 32 and len(answer["urls"]) == 1
    finally:
        await runner.cleanup()  # on_shutdown (stop_submitting), then the client's close
