"""The pytest plugin shipped for users: a project with no conftest gets the fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.anyio

USER_TESTS = """
import pytest

from wujie_async import JobFailedError
from wujie_async.emulator import FaultConfig


@pytest.mark.anyio
async def test_generate(wujie_client):
    result = await wujie_client.images.generate(prompt="a fox", model="dall-e-2", n=2)
    assert len(result.images) == 2


@pytest.mark.anyio
@pytest.mark.wujie_emulator(faults=FaultConfig(fail_jobs=1.0))
async def test_faults_from_the_marker(wujie_client):
    with pytest.raises(JobFailedError):
        await wujie_client.images.generate(prompt="a fox", model="dall-e-2")


@pytest.mark.anyio
async def test_faults_while_running(wujie_emulator, wujie_client):
    wujie_emulator.set_faults(FaultConfig(fail_jobs=1.0))
    with pytest.raises(JobFailedError):
        await wujie_client.images.generate(prompt="an owl", model="dall-e-2")
    assert wujie_emulator.stats()["submits_accepted"] == 1
"""


@pytest.mark.long
async def test_a_users_project_without_conftest_gets_the_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
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
