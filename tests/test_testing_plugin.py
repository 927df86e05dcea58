"""The pytest plugin shipped for users: a project with no conftest gets the fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from wujie_async.emulator import Emulator

pytestmark = pytest.mark.anyio

# The guide's example, as a user copies it (a test of its own fails when the guide is wrong).
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "testing.md"


def guide_example() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    return text.split("```python\n", 1)[1].split("```", 1)[0]


async def run_users_pytest(project: Path, *options: str) -> tuple[int, str]:
    """pytest in a user's project (no conftest): its return code and output. Without
    pytest-asyncio's options, it is disabled, as for a user who has only anyio's plugin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "WUJIE_"))}
    if not any("asyncio" in option for option in options):
        options = ("-p", "no:asyncio", *options)
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
             "-p", "no:looptime_plugin",  # a dev tool of ours (it wants pytest-asyncio)
             *options, "--rootdir", str(project), str(project)],
            cwd=project, env=env, check=False,
        )  # fmt: skip
    return done.returncode, done.stdout.decode() + done.stderr.decode()


@pytest.mark.long
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
async def test_a_users_project_without_conftest_gets_the_fixtures(
    tmp_path: Path, seed: int
) -> None:
    """The guide's example passes as written, whatever the emulator's seed."""
    example = guide_example().replace(
        "async def test_faults_while_running",
        f"@pytest.mark.wujie_emulator(seed={seed})\nasync def test_faults_while_running",
    )
    assert "seed=" in example
    (tmp_path / "test_user.py").write_text(example)
    returncode, output = await run_users_pytest(tmp_path, "--strict-markers", "-W", "error")
    assert returncode == 0, output
    assert "3 passed" in output, output


# A user's tests on pytest-asyncio, in the spellings each of its modes takes.
ASYNCIO_TESTS = """\
import pytest

from wujie_async import JobFailedError
from wujie_async.emulator import FaultConfig

MARK = {mark}


@MARK
async def test_fox(wujie_client):
    result = await wujie_client.images.generate(prompt="a fox", model="dall-e-2", n=2)
    assert len(result.images) == 2


@MARK
@pytest.mark.wujie_emulator(faults=FaultConfig(fail_jobs=1.0))
async def test_a_failing_gateway(wujie_emulator, wujie_client):
    with pytest.raises(JobFailedError):
        await wujie_client.images.generate(prompt="a fox", model="dall-e-2")
    assert wujie_emulator.stats()["submits_accepted"] == 1
"""


@pytest.mark.long
@pytest.mark.parametrize(
    ("mode", "mark"),
    [
        ("strict", "pytest.mark.asyncio"),
        ("auto", "pytest.mark.asyncio"),
        ("auto", "lambda test: test"),  # auto mode's tests need no mark
        ("strict", "pytest.mark.anyio"),  # anyio's plugin beside pytest-asyncio
    ],
)
async def test_the_fixtures_run_on_pytest_asyncios_loop(
    tmp_path: Path, mode: str, mark: str
) -> None:
    """A test pytest-asyncio runs gets a client on its own loop (anyio's plugin ran the
    fixtures on another, and every call raised "this client belongs to another event loop")."""
    (tmp_path / "test_user.py").write_text(ASYNCIO_TESTS.format(mark=mark))
    returncode, output = await run_users_pytest(
        tmp_path, "-p", "asyncio", "-o", f"asyncio_mode={mode}",
        "-o", "asyncio_default_fixture_loop_scope=function", "--strict-markers", "-W", "error",
    )  # fmt: skip
    assert returncode == 0, output
    assert "2 passed" in output, output


@pytest.mark.long
async def test_a_test_two_plugins_would_run_is_told_so(tmp_path: Path) -> None:
    """In pytest-asyncio's auto mode a test marked anyio is run by pytest-asyncio, its fixtures
    by anyio's plugin: the error says so and what to change, not "another event loop"."""
    (tmp_path / "test_user.py").write_text(ASYNCIO_TESTS.format(mark="pytest.mark.anyio"))
    returncode, output = await run_users_pytest(
        tmp_path, "-p", "asyncio", "-o", "asyncio_mode=auto",
        "-o", "asyncio_default_fixture_loop_scope=function",
    )  # fmt: skip
    assert returncode != 0, output
    assert "2 errors" in output, output
    assert "drop @pytest.mark.anyio" in output, output
    assert "another event loop;" not in output, output


@pytest.mark.long
@pytest.mark.parametrize(
    ("options", "mark", "told"),
    [
        # Fixtures on the session's loop, tests on their own: the ini setting to change.
        (["-o", "asyncio_default_fixture_loop_scope=session"], "pytest.mark.asyncio",
         'on its session-scoped event loop (asyncio_default_fixture_loop_scope = \'session\') '
         "and this test on its function-scoped one (asyncio_default_test_loop_scope = "
         '\'function\')'),
        # A test marked to run on the module's loop, fixtures on the test's.
        (["-o", "asyncio_default_fixture_loop_scope=function"],
         'pytest.mark.asyncio(loop_scope="module")',
         "on its function-scoped event loop (asyncio_default_fixture_loop_scope = 'function') "
         'and this test on its module-scoped one (@pytest.mark.asyncio(loop_scope="module"))'),
    ],
    ids=["fixtures-on-the-session-loop", "a-test-on-the-module-loop"],
)  # fmt: skip
async def test_fixtures_and_a_test_on_loops_of_two_scopes_are_told_what_to_set(
    tmp_path: Path, options: list[str], mark: str, told: str
) -> None:
    """pytest-asyncio running the fixtures on one loop and the test on another: the user got
    "this client belongs to another event loop" from the client's first call, and no word of
    which setting did it."""
    (tmp_path / "test_user.py").write_text(ASYNCIO_TESTS.format(mark=mark))
    returncode, output = await run_users_pytest(
        tmp_path, "-p", "asyncio", "-o", "asyncio_mode=strict", *options
    )
    assert returncode != 0, output
    assert "2 errors" in output, output
    assert told in output, output
    assert "set asyncio_default_fixture_loop_scope = " in output, output
    assert "another event loop;" not in output, output
    # Both on the session's loop: one loop, and the tests pass.
    (tmp_path / "test_user.py").write_text(ASYNCIO_TESTS.format(mark="pytest.mark.asyncio"))
    returncode, output = await run_users_pytest(
        tmp_path, "-p", "asyncio", "-o", "asyncio_mode=strict",
        "-o", "asyncio_default_fixture_loop_scope=session",
        "-o", "asyncio_default_test_loop_scope=session",
    )  # fmt: skip
    assert returncode == 0, output
    assert "2 passed" in output, output


@pytest.mark.anyio
async def test_the_fixtures_work_in_this_suite_too(wujie_client: object) -> None:
    from wujie_async import WujieClient

    assert isinstance(wujie_client, WujieClient)
    result = await wujie_client.images.generate(prompt="x", model="dall-e-2")
    assert result.status == 4


@pytest.mark.wujie_emulator(faults={"fail_jobs": 1.0})
async def test_faults_may_be_given_as_a_dict(wujie_client: object) -> None:
    from wujie_async import JobFailedError, WujieClient

    assert isinstance(wujie_client, WujieClient)
    with pytest.raises(JobFailedError):
        await wujie_client.images.generate(prompt="x", model="dall-e-2")


@pytest.mark.wujie_emulator(time_scale=0.02, seed=5)
class TestMarkersOfATestAndItsClass:
    """A module's or class's marker and a test's own add up (the test's wins where both set
    one): the test's marker took the place of the class's, whose time_scale was dropped."""

    @pytest.mark.wujie_emulator(faults={"fail_jobs": 1.0}, seed=7)
    async def test_add_up(self, wujie_emulator: Emulator) -> None:
        assert wujie_emulator.config.time_scale == 0.02  # the class's
        assert wujie_emulator.config.faults.fail_jobs == 1.0  # the test's
        assert wujie_emulator.config.seed == 7  # both: the test's

    async def test_the_class_marker_alone(self, wujie_emulator: Emulator) -> None:
        assert wujie_emulator.config.time_scale == 0.02
        assert wujie_emulator.config.seed == 5


@pytest.mark.wujie_emulator(time_scale=1.0)
async def test_the_client_polls_on_the_emulators_time_scale(
    wujie_client: object, wujie_emulator: Emulator
) -> None:
    from wujie_async import PollPolicy, WujieClient
    from wujie_async.testing import FAST_POLL, poll_for

    assert isinstance(wujie_client, WujieClient)
    assert wujie_emulator.config.time_scale == 1.0  # what the marker set, readable
    # At the real gateway's pace, near the defaults a user gets: not 98 calls for one 5 s job.
    assert wujie_client.poll_policy == poll_for(1.0)
    default, scaled = PollPolicy(), poll_for(1.0)
    assert scaled.min_interval == default.min_interval
    assert scaled.first_poll_delay == default.first_poll_delay
    assert scaled.unknown_key_grace == default.unknown_key_grace
    assert poll_for(0.05).min_interval == pytest.approx(5 * FAST_POLL.min_interval)
    assert poll_for(0.01) == FAST_POLL


@pytest.mark.long
async def test_a_wrong_marker_fails_the_test_where_it_is_written(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.anyio\n\n"
        "@pytest.mark.wujie_emulator(0.05)\n"
        "async def test_positional(wujie_client):\n    pass\n\n"
        "@pytest.mark.wujie_emulator(time_scale='fast')\n"
        "async def test_wrong_type(wujie_client):\n    pass\n\n"
        "@pytest.mark.wujie_emulator(fail_jobs=1.0)\n"
        "async def test_not_a_setting(wujie_client):\n    pass\n\n"
        "@pytest.mark.wujie_emulator(faults={'fail_jobs': 2})\n"
        "async def test_a_fault_out_of_range(wujie_client):\n    pass\n"
    )
    returncode, output = await run_users_pytest(tmp_path)
    assert returncode != 0, output
    assert "not by position: got (0.05,)" in output, output
    assert "time_scale: expected a finite number, got 'fast'" in output, output
    assert "unexpected keyword argument 'fail_jobs'" in output, output
    assert "faults.fail_jobs: " in output, output  # as faults=FaultConfig(...) names it


@pytest.mark.long
async def test_a_test_that_leaves_jobs_running_is_warned(tmp_path: Path) -> None:
    """A test that submits and never awaits passes with a warning naming its job (it passed
    in silence: closing the client cancelled the paid job); one that awaits, cancels on
    purpose, or failed anyway gets none."""
    (tmp_path / "test_user.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.anyio\n\n"
        "async def test_forgot(wujie_client):\n"
        "    job = await wujie_client.images.submit(prompt='a fox', model='dall-e-2')\n"
        "    print('KEY', job.key)\n\n"
        "async def test_awaited(wujie_client):\n"
        "    await (await wujie_client.images.submit(prompt='a fox', model='dall-e-2'))\n\n"
        "async def test_cancelled_on_purpose(wujie_client):\n"
        "    (await wujie_client.images.submit(prompt='a fox', model='dall-e-2')).cancel()\n\n"
        "async def test_failed_anyway(wujie_client):\n"
        "    await wujie_client.images.submit(prompt='a fox', model='dall-e-2')\n"
        "    assert False, 'the test failed'\n"
    )
    returncode, output = await run_users_pytest(tmp_path, "-rA")
    assert returncode == 1, output
    assert "1 failed, 3 passed, 1 warning" in output, output
    key = output.split("KEY ", 1)[1].split()[0]
    assert (
        f"UnawaitedJobsWarning: test_user.py::test_forgot[asyncio] ended with 1 job(s) of "
        f"wujie_client still running ({key})"
    ) in output, output
