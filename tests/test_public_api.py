from __future__ import annotations

import asyncio
import inspect

import pytest

import wujie_async
from wujie_async import ImageJob, WujieError


def test_all_is_sorted_and_complete() -> None:
    names = wujie_async.__all__
    assert names == sorted(names)
    public = {
        name
        for name, value in vars(wujie_async).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(names) - {"__version__"}


def test_every_public_error_derives_from_wujie_error_and_is_documented() -> None:
    errors = [
        value
        for value in vars(wujie_async).values()
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]
    assert len(errors) > 10
    tree = wujie_async._errors.__doc__ or ""
    for error in errors:
        assert issubclass(error, WujieError)
        assert error.__name__ in tree, f"{error.__name__} is missing from the drawn tree"
        assert error.__doc__


def test_every_public_name_has_a_docstring() -> None:
    for name in wujie_async.__all__:
        value = getattr(wujie_async, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__doc__, name


def test_package_ships_py_typed() -> None:
    from pathlib import Path

    assert (Path(wujie_async.__file__).parent / "py.typed").exists()


@pytest.mark.anyio
async def test_an_image_job_is_read_only_for_its_users() -> None:
    """Only the poller feeds a job: its views cannot be set, and it has no feeding methods."""
    loop = asyncio.get_running_loop()
    job = ImageJob("K1", loop, deadline=loop.time() + 60, n=2)
    for name, value in (("status", 4), ("progress", 100.0), ("images", ()), ("key", "K2")):
        with pytest.raises(AttributeError):
            setattr(job, name, value)
    for name in ("succeed", "fail", "add_images", "report", "record_report", "due", "last_seen"):
        assert not hasattr(job, name), name
    assert job.status is None and job.status_name == "pending" and not job.done()
