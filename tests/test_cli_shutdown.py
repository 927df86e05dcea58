"""The bulk CLI ends within its deadline, with the exit code its guide promises: a signal after
a disk stopped the run, and waits that a frozen disk or a hung name lookup could hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from wujie_async.cli._rows import ROWS_DEADLINE_S
from wujie_async.cli._signals import TERM_GRACE_S

from .cli_helpers import (
    CLEAN_ENV,
    ForkedCli,
    Served,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    journal_keys,
    keys_in_rows_after_a_refusal,
    manifest,
    manifest_so_far,
    proc_alive,
    reserve_size,
    running_cli,
    served_emulator,
)
from .helpers import eventually, freezable_disk, freeze, full_disk

pytestmark = pytest.mark.anyio


# The embedded emulator's flags that hold every submit's reply 30 s (a submit on the wire).
_HELD_SUBMITS = [
    flag
    for fault in ("slow_reply=1", "slow_reply_s=30", "endpoints=generations")
    for flag in ("--emulator-fault", fault)
]


async def _accepted(emu: Served) -> int:
    return int((await emu.stats())["submits_accepted"])


def _fill(disk: Path) -> None:
    """Write until the disk refuses."""
    with (disk / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(4096))


@pytest.mark.long
async def test_sigterm_after_a_full_disk_stopped_the_run_exits_143(tmp_path: Path) -> None:
    """A disk that filled stops the sending (exit 3 if nothing else comes) while the jobs out
    are still collected; a SIGTERM then stops the run as it stops any run: the jobs out are
    left pending and the exit code is 143 (it was 3, the signal quitting at once as a
    second one would)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        prompts = tmp_path / "prompts.txt"
        # Rows of 3 KB: the full disk refuses the next one (tmpfs pages).
        prompts.write_text("".join(f"term {i} {'x' * 3000}\n" for i in range(10)))
        with full_disk(tmp_path / "disk", size="1m", fill=False) as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--no-journal", "--rate", "2"]
            async with running_cli(*bulk, env=emu.env) as run:
                alive = proc_alive(run)
                await eventually(lambda: _accepted_ge(emu, 2), what="2 submits", alive=alive)
                reserved = reserve_size(out)
                assert reserved > 0  # set aside before anything was sent
                await anyio.to_thread.run_sync(_fill, disk)
                await eventually(
                    keys_in_rows_after_a_refusal(emu, out, reserved),
                    what="a refused row",
                    alive=alive,
                )
                run.send_signal(signal.SIGTERM)
                code, _, err = await run.finish(TERM_GRACE_S + 10)
            assert code == 143, err
            assert "stopped: the manifest could not be written (No space left" in err
            assert "stopped by SIGTERM: submitted jobs keep running on the gateway" in err
            sent = await _accepted(emu)
            assert 0 < sent < 10
            pending = {r["key"] for r in manifest(out) if r["status"] == "pending"}
            assert len(pending) == sent  # every paid job's key kept


async def _accepted_ge(emu: Served, count: int) -> bool:
    return await _accepted(emu) >= count


@contextlib.contextmanager
def _silent_name_server() -> Iterator[tuple[str, socket.socket]]:
    """A name server on loopback port 53 that takes every query and never answers (skips
    where port 53 cannot be bound)."""
    for last in range(53, 80):
        address = f"127.0.0.{last}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((address, 53))
        except PermissionError as exc:
            sock.close()
            pytest.skip(f"cannot bind port 53 here: {exc}")
        except OSError:
            sock.close()
            continue
        sock.setblocking(False)
        with sock:
            yield address, sock
        return
    pytest.skip("no loopback address with port 53 free")


# The command as a process, with uvloop when it is installed (libuv's threads resolve), and as
# a user without uvloop runs it (asyncio's default executor resolves).
_COMMAND = {
    "installed loop": ["-m", "wujie_async"],
    "asyncio loop": [
        "-c",
        "import runpy, sys; sys.modules['uvloop'] = None; "
        "runpy.run_module('wujie_async', run_name='__main__', alter_sys=True)",
    ],
}


@pytest.mark.long
@pytest.mark.parametrize("loop", sorted(_COMMAND))
async def test_a_run_whose_gateway_name_never_resolves_exits_within_its_grace(
    tmp_path: Path, loop: str
) -> None:
    """getaddrinfo blocked in aiohttp's resolver thread (a name server that never answers,
    the real C call: the run sees a resolv.conf of its own, bind-mounted in a mount namespace
    of its own): SIGTERM ends the run within its grace period, summary and exit 143 included.
    The run printed its summary and then waited for the blocked thread at exit (minutes)."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        pytest.skip("needs util-linux unshare (Linux)")
    async with served_emulator(tmp_path) as emu:  # for credentials only: it is never reached
        env = emu.env | {"WUJIE_BASE_URL": "https://gateway.hang.example/wj-open/v1"}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    with _silent_name_server() as (address, server):
        resolv = tmp_path / "resolv.conf"
        resolv.write_text(f"nameserver {address}\noptions timeout:30 attempts:5\n")
        script = 'mount --bind "$1" /etc/resolv.conf || exit 99; shift; exec "$@"'
        proc = await asyncio.create_subprocess_exec(
            "unshare", "-m", "sh", "-c", script, "sh", str(resolv),
            sys.executable, *_COMMAND[loop], "bulk", str(prompts), "-o", str(tmp_path / "out"),
            "--no-journal", env=env or CLEAN_ENV,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            query = asyncio.ensure_future(asyncio.get_running_loop().sock_recvfrom(server, 512))
            ended = asyncio.ensure_future(proc.wait())
            await asyncio.wait({query, ended}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if ended.done() and not query.done():
                _, err = await proc.communicate()
                if proc.returncode == 99:
                    pytest.skip(f"cannot bind-mount resolv.conf here: {err.decode()}")
                raise AssertionError(f"the run ended before asking the name: {err.decode()}")
            assert query.done(), "no name query within 60 s"
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), TERM_GRACE_S + 10)
        finally:
            query.cancel()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == 143, text
    assert "1 line(s):" in text and "stopped by SIGTERM" in text


@pytest.mark.long
async def test_a_key_the_full_disk_kept_out_of_the_journal_is_on_disk_before_a_kill(
    tmp_path: Path,
) -> None:
    """The journal (on the output folder's disk) wrote two submits' intents; the disk filled
    while they were on the wire, so it could not write their keys. Each key it refused gets a
    pending manifest row at once (room set aside for it): a run killed outright then leaves it
    to the re-run, which collects the jobs and pays for no line again. The keys lived only in
    a WARNING and in memory until their lines ended (the kill lost them), and the re-run left
    both lines ``uncertain``: paid, images never fetched.

    The room given back for the first key's row may let the journal write the second key (the
    replies come milliseconds apart): the kill waits until every key is on disk, in the
    journal or in a pending row, and at least one in a row."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "8,8") as emu:
        await emu.set_faults(slow_reply=1.0, slow_reply_s=3.0, endpoints=["generations"])
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\nan owl\na cat\n")
        with full_disk(tmp_path / "disk", size="1m", fill=False) as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--model", "dall-e-2", "--json"]
            async with running_cli(*bulk, env=emu.env) as run:
                alive = proc_alive(run)
                # The probe goes alone; once it is accepted (its key journaled), the other
                # two lines go together, and their intents are journaled before they leave.
                await eventually(lambda: _arrived(emu, 3), what="3 submits", alive=alive)
                await anyio.to_thread.run_sync(_fill, disk)

                async def keys_on_disk() -> set[str]:
                    """The keys in pending rows, once every accepted key is on disk."""
                    keys = set((await emu.stats())["timelines"])
                    rows = manifest_so_far(out)
                    pending = {str(r.get("key")) for r in rows if r["status"] == "pending"}
                    journaled = journal_keys(out / "journal.sqlite")
                    on_disk = len(keys) == 3 and keys <= pending | journaled
                    return pending & keys if on_disk else set()

                in_rows = await eventually(keys_on_disk, what="every key on disk", alive=alive)
                # The probe's key was journaled before the disk filled, never a row's.
                assert 1 <= len(in_rows) <= 2
                run.send_signal(signal.SIGKILL)
                await run.finish(10)
            (disk / "filler").unlink()
            await emu.set_faults()
            async with running_cli(*bulk, env=emu.env) as again:
                code, stdout, err = await again.finish(60)
            assert code == 0, err
            assert json.loads(stdout)["outcomes"]["saved"] == 3, err
            assert await _accepted(emu) == 3  # each line paid once


async def _arrived(emu: Served, count: int) -> bool:
    """Submits the emulator received, answered or not (a held reply counts)."""
    return int((await emu.stats())["requests"].get("generations", 0)) >= count


@pytest.mark.long
async def test_sigterm_ends_a_run_whose_manifest_disk_froze_and_names_the_rows_not_written(
    tmp_path: Path,
) -> None:
    """The output folder's file system freezes mid-run (``fsfreeze``: every write blocks, as
    on a hung NFS mount). A SIGTERM still stops the run: its summary comes within the grace
    period, says the manifest could not be written and names the keys of the jobs whose rows
    the disk did not take (``--json``: ``manifest_unwritten_keys``, which it lacked). Rows
    were written on the event loop: the first one blocked it, and with it the signal handlers
    (no summary until the disk thawed, or SIGKILL)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"frozen {i}\n" for i in range(6)))
        with freezable_disk(tmp_path / "disk") as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--no-journal", "--rate", "2", "--json"]
            async with running_cli(*bulk, env=emu.env) as run:
                if not hasattr(run, "stderr"):
                    pytest.skip("needs the CLI's stderr while it runs (the fork server)")
                alive = proc_alive(run)
                await eventually(lambda: _accepted_ge(emu, 2), what="2 submits", alive=alive)
                freeze = ["fsfreeze", "-f", str(disk)]
                await anyio.to_thread.run_sync(lambda: subprocess.run(freeze, check=True))
                try:
                    # A job accepted now has its key's row held by the frozen disk.
                    frozen_at = await _accepted(emu)
                    await eventually(
                        lambda: _accepted_ge(emu, frozen_at + 1), what="a submit", alive=alive
                    )
                    run.send_signal(signal.SIGTERM)
                    summary = await eventually(
                        lambda: "line(s):" in run.stderr().decode(),
                        what="the summary while the disk is frozen",
                        timeout=TERM_GRACE_S + 5,
                    )
                    assert summary
                    err = run.stderr().decode()
                finally:
                    thaw = ["fsfreeze", "-u", str(disk)]
                    await anyio.to_thread.run_sync(lambda: subprocess.run(thaw, check=False))
                code, stdout, _ = await run.finish(20)
            assert code == 143, err
            assert "stopped: the manifest could not be written (its disk took no row" in err
            assert "whose outcome the manifest could not record" in err
            keys = set((await emu.stats())["timelines"])
            recorded = {r.get("key") for r in manifest(out)}
            assert all(key in recorded or key in err for key in keys), (keys, recorded, err)
            assert any(key not in recorded for key in keys) or "could not record" in err
            summary = json.loads(stdout)
            unwritten = summary["manifest_unwritten_keys"]
            assert unwritten and all(key in err for key in unwritten), (unwritten, err)
            assert all(key in recorded or key in unwritten for key in keys), (keys, unwritten)
            assert summary["journal_uncommitted_keys"] == []


@pytest.mark.long
async def test_a_run_whose_manifest_disk_froze_stops_sending_within_the_rows_deadline(
    tmp_path: Path,
) -> None:
    """Without a journal, a job's key is kept only by its manifest row. The output folder's
    file system freezes mid-run: no row is written, and the run stops sending within
    ``ROWS_DEADLINE_S`` (and a check), as at a refusing disk (a SIGTERM then ends it). With
    rows written on a thread, nothing noticed until the end: every line was sent and paid for
    while its key's row waited in memory (10 of 10; a kill then lost every key, and the
    re-run paid again)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"frozen {i}\n" for i in range(16)))
        with freezable_disk(tmp_path / "disk") as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--no-journal", "--rate", "2"]
            async with running_cli(*bulk, env=emu.env) as run:
                if not hasattr(run, "stderr"):
                    pytest.skip("needs the CLI's stderr while it runs (the fork server)")
                alive = proc_alive(run)
                await eventually(lambda: _accepted_ge(emu, 2), what="2 submits", alive=alive)
                with freeze(disk):
                    frozen_at = await _accepted(emu)
                    shown = len(run.stderr())
                    # No line waits to be sent any more (sent, or ended unsent by the stop).
                    await eventually(
                        lambda: "to send 0 " in run.stderr()[shown:].decode(),
                        what="no line left to send",
                        timeout=30,
                        alive=alive,
                    )
                    accepted = await _accepted(emu)
                    run.send_signal(signal.SIGTERM)
                    await eventually(
                        lambda: "line(s):" in run.stderr().decode(),
                        what="the summary while the disk is frozen",
                        timeout=TERM_GRACE_S + 5,
                    )
                    err = run.stderr().decode()
                code, _, _ = await run.finish(20)
            assert code == 143, err
            assert "its disk took no row" in err
            assert "but for the keys listed above" in err  # a re-run would not know them
            # 2 a second, for the deadline and a check, and one on the wire: not all 16 lines.
            assert accepted <= frozen_at + 6, (frozen_at, accepted)
            keys = set((await emu.stats())["timelines"])
            recorded = {r.get("key") for r in manifest(out)}
            assert all(key in recorded or key in err for key in keys), (keys, recorded, err)


@pytest.mark.long
async def test_sigterm_ends_a_run_whose_journal_disk_froze_and_names_the_keys_not_journaled(
    tmp_path: Path,
) -> None:
    """The journal's file system (``--journal`` on a disk of its own) freezes while a submit's
    reply is on its way: its key reaches a journal that takes no write. A SIGTERM still ends
    the run: the client's close stops waiting for the journal after its deadline, and the
    summary, printed while the disk is still frozen, names the key the journal may lack (the
    WARNING names the file; ``--json``: ``journal_uncommitted_keys``). Closing waited for the
    journal's last commit with no deadline: no summary until the disk thawed, or SIGKILL."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        await emu.set_faults(slow_reply=1.0, slow_reply_s=4.0, endpoints=["generations"])
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\nan owl\n")
        with freezable_disk(tmp_path / "disk") as disk:
            journal = disk / "journal.sqlite"
            out = tmp_path / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--journal", str(journal)]
            async with running_cli(*bulk, "--model", "dall-e-2", "--json", env=emu.env) as run:
                if not hasattr(run, "stderr"):
                    pytest.skip("needs the CLI's stderr while it runs (the fork server)")
                alive = proc_alive(run)
                # The probe's intent is journaled before it is sent; its reply is held 4 s.
                await eventually(lambda: _arrived(emu, 1), what="the first submit", alive=alive)
                with freeze(disk):
                    assert await _accepted(emu) == 0  # frozen before any key came back
                    # Its key comes back now, to a journal that takes no write.
                    await eventually(lambda: _accepted_ge(emu, 1), what="a key", alive=alive)
                    run.send_signal(signal.SIGTERM)
                    summary = await eventually(
                        lambda: "line(s):" in run.stderr().decode(),
                        what="the summary while the journal's disk is frozen",
                        timeout=TERM_GRACE_S + 10,
                    )
                    assert summary
                    err = run.stderr().decode()
                code, stdout, _ = await run.finish(20)
            assert code == 143, err
            (key,) = set((await emu.stats())["timelines"])
            said = [line for line in err.splitlines() if line.startswith("warning: the journal")]
            assert said and key in said[0] and str(journal) in said[0], err
            assert f"journal {journal}: its disk took no write" in err
            assert json.loads(stdout)["journal_uncommitted_keys"] == [key]


def _progress_lines(run: ForkedCli) -> int:
    """How many ``progress:`` lines the run printed (plain mode: one as it starts, one as
    its work ends and its closing waits begin, none between with a long interval)."""
    return sum(line.startswith("progress:") for line in run.stderr().decode().splitlines())


# A plain progress line as the run starts and as its work ends (and its closing waits begin).
_TWO_PROGRESS_LINES = ("--progress", "plain", "--progress-interval", "3600")


@pytest.mark.long
async def test_sigterm_again_in_the_closing_waits_of_a_frozen_disk_ends_them_with_the_summary(
    tmp_path: Path,
) -> None:
    """SIGTERM, then SIGTERM again once the run's work has ended and it waits for the rows a
    frozen disk holds: the waits end at once, the summary comes (the keys of the rows not
    written included) and the exit code is 143. The run's handlers were restored as its work
    ended: the second SIGTERM met the default one and killed the process without a summary,
    its keys never said."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"frozen {i}\n" for i in range(6)))
        with freezable_disk(tmp_path / "disk") as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--no-journal", "--rate", "2"]
            async with running_cli(*bulk, *_TWO_PROGRESS_LINES, "--json", env=emu.env) as run:
                if not isinstance(run, ForkedCli):
                    pytest.skip("needs the CLI's stderr while it runs (the fork server)")
                alive = proc_alive(run)
                await eventually(lambda: _accepted_ge(emu, 2), what="2 submits", alive=alive)
                with freeze(disk):
                    # A job accepted now has its key's row held by the frozen disk.
                    frozen_at = await _accepted(emu)
                    await eventually(
                        lambda: _accepted_ge(emu, frozen_at + 1), what="a submit", alive=alive
                    )
                    run.send_signal(signal.SIGTERM)
                    await eventually(
                        lambda: _progress_lines(run) >= 2, what="the run's end", alive=alive
                    )
                    loop = asyncio.get_running_loop()
                    run.send_signal(signal.SIGTERM)  # in its closing waits (1.5 s for the rows)
                    again = loop.time()
                    await eventually(
                        lambda: "line(s):" in run.stderr().decode(),
                        what="the summary while the disk is frozen",
                        timeout=ROWS_DEADLINE_S + 5,
                    )
                    # The waits ended at once rather than at their bounds.
                    assert loop.time() - again < ROWS_DEADLINE_S, loop.time() - again
                    err = run.stderr().decode()
                code, stdout, _ = await run.finish(20)
            assert code == 143, err
            assert json.loads(stdout)["exit_code"] == 143
            assert "whose outcome the manifest could not record" in err
            keys = set((await emu.stats())["timelines"])
            recorded = {r.get("key") for r in manifest(out)}
            assert all(key in recorded or key in err for key in keys), (keys, recorded, err)


@pytest.mark.long
async def test_ctrl_c_pressed_until_the_summary_comes_never_kills_it(tmp_path: Path) -> None:
    """Ctrl-C, then Ctrl-C again and again until the summary comes: the second quits at once
    (the submit on the wire, whose reply the embedded emulator holds 30 s, ends uncertain),
    the later ones meet the run's closing waits (the embedded emulator's shutdown waits up to
    1 s for that held reply) and end them. The summary is printed, exit 130. The run's
    handlers were restored as its work ended: a Ctrl-C in those waits raised
    KeyboardInterrupt, and the command said only "interrupted", its summary never printed."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\nan owl\n")
    bulk = ["bulk", str(prompts), "-o", str(tmp_path / "out"), "--emulator", *_HELD_SUBMITS]
    async with running_cli(*bulk, *_TWO_PROGRESS_LINES) as run:
        if not isinstance(run, ForkedCli):
            pytest.skip("needs the CLI's stderr while it runs (the fork server)")
        alive = proc_alive(run)
        # The first line's submit leaves as the run starts; its reply is held.
        await eventually(lambda: _progress_lines(run) >= 1, what="the run's start", alive=alive)
        code, err = await _ctrl_c_until(run, "line(s):")
    assert code == 130, err
    assert "2 line(s):" in err


@pytest.mark.long
async def test_sigterm_ends_a_run_whose_manifest_and_journal_disk_froze_within_8_s(
    tmp_path: Path,
) -> None:
    """The output folder's file system, the journal's too, freezes while a submit's reply is
    on its way: its key reaches a journal that takes no write. SIGTERM: the summary comes
    within 8 s (``docker stop`` gives 10), naming the key, with exit 143. It came after 13 s:
    the submit waited out the whole 8 s grace for the journal's write of its key, then the
    rows (1.5 s), the journal's close (2 s) and the disk reserve's removal (1.5 s) were
    waited for one after another; then about 6 s (the journal held 2 s, then the rows and
    the journal's close one after the other). Now about 4.3 s: the rows and the close are
    waited for at once. (The bound stays 8 s: a tighter one would leave a loaded 2-core
    machine less than twice the time it takes.)"""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        await emu.set_faults(slow_reply=1.0, slow_reply_s=4.0, endpoints=["generations"])
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\nan owl\na cat\n")
        with freezable_disk(tmp_path / "disk") as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--model", "dall-e-2", "--json"]
            async with running_cli(*bulk, env=emu.env) as run:
                if not isinstance(run, ForkedCli):
                    pytest.skip("needs the CLI's stderr while it runs (the fork server)")
                alive = proc_alive(run)
                # The probe's intent is journaled before it is sent; its reply is held 4 s.
                await eventually(lambda: _arrived(emu, 1), what="the first submit", alive=alive)
                with freeze(disk):
                    assert await _accepted(emu) == 0  # frozen before any key came back
                    await eventually(lambda: _accepted_ge(emu, 1), what="a key", alive=alive)
                    loop = asyncio.get_running_loop()
                    run.send_signal(signal.SIGTERM)
                    sent = loop.time()
                    await eventually(
                        lambda: "line(s):" in run.stderr().decode(),
                        what="the summary within 8 s of SIGTERM",
                        timeout=8.0,
                    )
                    # Shown with `pytest -s -n 0`: how long the summary took (about 4.3 s).
                    print(f"SIGTERM to summary: {loop.time() - sent:.2f} s")  # noqa: T201
                    err = run.stderr().decode()
                code, stdout, _ = await run.finish(20)
            assert code == 143, err
            (key,) = set((await emu.stats())["timelines"])
            said = [line for line in err.splitlines() if line.startswith("warning: the journal")]
            assert said and key in said[0], err
            summary = json.loads(stdout)
            assert summary["journal_uncommitted_keys"] == [key]
            # Its line's row, with the key, is one the frozen disk did not take.
            assert summary["manifest_unwritten_keys"] == [key]
            assert summary["pending"] == 1 and summary["outcomes"]["not_sent"] == 2


async def _an_uncertain_row(emu: Served, out: Path, tmp_path: Path) -> None:
    """A bulk run whose one line's reply the emulator drops: its journal row is uncertain,
    for ``journal resend`` to send again."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    await emu.set_faults(drop_after_accept=1.0)
    code, stdout, err = await cli("bulk", str(prompts), "-o", str(out), "--json", env=emu.env)
    assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err


def _journal_rows(journal: Path) -> int:
    """The rows of a journal another process holds open (read-only: SQLite's WAL lets one
    reader in beside its writer)."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        (rows,) = db.execute("SELECT count(*) FROM submits").fetchone()
    return int(rows)


@pytest.mark.long
async def test_ctrl_c_pressed_until_a_resends_summary_comes_never_kills_it(
    tmp_path: Path,
) -> None:
    """`journal resend`, as bulk: Ctrl-C, then Ctrl-C again and again until the summary
    comes. The second quits at once (the resend on the wire, whose reply the embedded
    emulator holds 30 s, ends uncertain), the later ones meet its closing waits (the embedded
    emulator's shutdown waits up to 1 s for that held reply) and end them: the summary is
    printed, exit 130. Its handlers were removed before those waits: a Ctrl-C there raised
    KeyboardInterrupt, and the command said only "interrupted", its summary never printed."""
    out = tmp_path / "out"
    async with served_emulator(tmp_path) as emu:
        await _an_uncertain_row(emu, out, tmp_path)
    resend = ["journal", "resend", "--all-uncertain", "--yes", "-o", str(out), "--emulator"]
    async with running_cli(*resend, *_HELD_SUBMITS) as run:
        if not isinstance(run, ForkedCli):
            pytest.skip("needs the CLI's stderr while it runs (the fork server)")
        alive = proc_alive(run)
        # The resend's intent is journaled (a second row) as it leaves, its handlers in place.
        await eventually(
            lambda: _journal_rows(out / "journal.sqlite") >= 2, what="the resend", alive=alive
        )
        code, err = await _ctrl_c_until(run, "row(s):")
    assert code == 130, err
    assert "resent 1 row(s): 0 saved" in err


@pytest.mark.long
async def test_sigterm_again_in_a_resends_closing_waits_of_a_frozen_disk_names_the_keys(
    tmp_path: Path,
) -> None:
    """`journal resend` whose output folder's file system, and journal, freeze while its
    submit's reply is on its way: its key reaches a journal and a manifest that take no
    write. SIGTERM, then SIGTERM again and again: the run quits, the later signals end its
    closing waits, and the summary comes while the disk is still frozen, naming the key the
    journal may lack and saying the manifest's last rows were not written; exit 143. Its
    handlers were removed before those waits: a SIGTERM there killed it without a summary
    (once the disk let it die), the key never said."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        with freezable_disk(tmp_path / "disk") as disk:
            out = disk / "out"
            await _an_uncertain_row(emu, out, tmp_path)
            await emu.set_faults(slow_reply=1.0, slow_reply_s=4.0, endpoints=["generations"])
            resend = ["journal", "resend", "--all-uncertain", "--yes", "-o", str(out)]
            async with running_cli(*resend, env=emu.env) as run:
                if not isinstance(run, ForkedCli):
                    pytest.skip("needs the CLI's stderr while it runs (the fork server)")
                alive = proc_alive(run)
                stats = await emu.stats()
                before, keys = await _accepted(emu), set(stats["timelines"])
                sent = int(stats["requests"].get("generations", 0))
                # The resend's intent is journaled before it is sent; its reply is held 4 s.
                await eventually(lambda: _arrived(emu, sent + 1), what="the resend", alive=alive)
                with freeze(disk):
                    assert await _accepted(emu) == before  # frozen before its key came back
                    await eventually(
                        lambda: _accepted_ge(emu, before + 1), what="a key", alive=alive
                    )

                    await _again_until_summary(
                        run, "row(s):", signal.SIGTERM, timeout=TERM_GRACE_S + 5
                    )
                    err = run.stderr().decode()
                code, _, _ = await run.finish(20)
            assert code == 143, err
            assert "resent 1 row(s): 0 saved" in err
            (key,) = set((await emu.stats())["timelines"]) - keys  # the resend's job
            said = [line for line in err.splitlines() if line.startswith("warning: the journal")]
            assert said and key in said[0], err
            # (The second SIGTERM quit the run while the submit waited for the journal to take
            # its key: its line ends uncertain, the key said by the journal's warning.)
            assert "stopped: the manifest's last rows were not written" in err, err
            # Those rows held no key (the line ended uncertain): none is said to be listed.
            assert "none of them held a job key" in err and "listed below" not in err, err


async def _ctrl_c_until(run: ForkedCli, summary: str) -> tuple[int | None, str]:
    """Ctrl-C, then Ctrl-C again every 0.1 s until the summary (its ``summary`` words) is
    printed or the process ended; its exit code and stderr."""
    alive = proc_alive(run)
    run.send_signal(signal.SIGINT)
    await eventually(lambda: "SIGINT: stopping" in run.stderr().decode(), alive=alive)
    await _again_until_summary(run, summary, signal.SIGINT, timeout=20)
    code, _, err = await run.finish(20)
    return code, err


async def _again_until_summary(
    run: ForkedCli, summary: str, sig: signal.Signals, *, timeout: float
) -> None:
    """Send ``sig`` every 0.1 s until the summary (its ``summary`` words) is printed or the
    process ended, within ``timeout`` seconds."""

    def summary_or_again() -> bool:
        if summary in run.stderr().decode() or run.returncode is not None:
            return True
        run.send_signal(sig)
        return False

    await eventually(summary_or_again, interval=0.1, what="the summary", timeout=timeout)


@pytest.mark.long
async def test_a_resend_whose_journal_disk_fills_up_still_prints_its_summary(
    tmp_path: Path,
) -> None:
    """`journal resend` on a disk that fills up while its submit's reply is on its way: the
    journal refuses the forgetting of the row it sent again. That ended the command with a
    traceback (no summary, the client not closed); the summary now comes, saying the row
    stays uncertain and how to drop it (in that journal: the commands named none, and read
    the default one)."""
    async with served_emulator(tmp_path) as emu:
        with full_disk(tmp_path / "disk", size="2m", fill=False) as disk:
            out = disk / "out"
            await _an_uncertain_row(emu, out, tmp_path)
            await emu.set_faults(slow_reply=1.0, slow_reply_s=2.0, endpoints=["generations"])
            resend = ["journal", "resend", "--all-uncertain", "--yes", "-o", str(out)]
            async with running_cli(*resend, env=emu.env) as run:
                if not isinstance(run, ForkedCli):
                    pytest.skip("needs the CLI's stderr while it runs (the fork server)")
                alive = proc_alive(run)
                sent = int((await emu.stats())["requests"].get("generations", 0))
                await eventually(lambda: _arrived(emu, sent + 1), what="the resend", alive=alive)
                _fill(disk)  # while its reply is held
                code, _, err = await run.finish(30)
    assert code is not None and "Traceback" not in err, err
    assert "row(s):" in err, err  # the summary
    assert "did not forget the 1 old row(s) of the lines this run sent again" in err, err
    # Its command names the journal (without it, it reads ./out/journal.sqlite instead) and
    # the old row by its number (the line's name would take its new row too).
    journal = shlex.quote(str(out / "journal.sqlite"))
    assert f"journal forget 'row 1' --yes --journal {journal}`" in err, err
