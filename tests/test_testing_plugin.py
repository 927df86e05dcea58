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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "WUJIE_"))}
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers",
             "-p", "no:looptime_plugin",  # a dev tool of ours (it wants pytest-asyncio)
             "-W", "error", "--rootdir", str(tmp_path), str(tmp_path)],
            cwd=tmp_path, env=env, check=False,
        )  # fmt: skip
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    assert "3 passed" in output, output


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "WUJIE_"))}
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "-p", "no:looptime_plugin", "--rootdir", str(tmp_path), str(tmp_path)],
            cwd=tmp_path, env=env, check=False,
        )  # fmt: skip
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode != 0, output
    assert "not by position: got (0.05,)" in output, output
    assert "time_scale: expected a finite number, got 'fast'" in output, output
    assert "unexpected keyword argument 'fail_jobs'" in output, output
    assert "faults.fail_jobs: " in output, output  # as faults=FaultConfig(...) names it
