"""Pytest fixtures for testing code that uses wujie_async: the gateway emulator and a client
bound to it. Installed with the package as a pytest plugin (a ``pytest11`` entry point), so a
project needs no conftest::

    import pytest

    @pytest.mark.anyio
    async def test_fox(wujie_client):
        result = await wujie_client.images.generate(prompt="a fox", model="dall-e-2")
        assert len(result.images) == 1

Fixtures:

* ``wujie_emulator``: an :class:`~wujie_async.emulator.Emulator` on loopback, jobs on a fast
  time scale (0.01: a "20 s" job takes 0.2 s), seeded. Settings come from the
  ``@pytest.mark.wujie_emulator(...)`` marker (any :class:`~wujie_async.emulator.EmulatorConfig`
  field by name, e.g. ``time_scale=0.05`` or ``faults=FaultConfig(fail_jobs=0.5)``, or faults
  as a dict, ``faults={"fail_jobs": 0.5}``; markers of the module, the class and the test add
  up, the closest one's value winning for a setting given twice; a setting of the wrong type
  or out of range is an ``InvalidRequestError`` naming it); faults can also change while it
  runs, with
  ``wujie_emulator.set_faults(FaultConfig(...))``.
* ``wujie_client``: an open :class:`~wujie_async.WujieClient` bound to that emulator, polling
  on the emulator's time scale (:func:`poll_for`: :data:`FAST_POLL` at the default scale) with
  instant retries (:data:`INSTANT_RETRY`).

The fixtures are async and run on the loop of the plugin that runs the test: anyio's pytest
plugin (``@pytest.mark.anyio``, shipped with anyio) on asyncio, which aiohttp needs, or
pytest-asyncio (``@pytest.mark.asyncio``, or no mark in its auto mode). A test marked anyio
that pytest-asyncio runs too (its auto mode) fails with an error saying to drop the anyio mark.
Under pytest-asyncio the fixtures run on the loop of ``asyncio_default_fixture_loop_scope``; a
test on a loop of another scope (``asyncio_default_fixture_loop_scope = "session"`` beside tests
on their own ``function`` loops, say) fails with an error saying what to set.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any, TypeVar, cast

import pytest

from . import InvalidRequestError, PollPolicy, RetryPolicy, WujieClient
from ._errors import some_and_more
from .emulator import Emulator, EmulatorConfig, fault_config_from_mapping

_pytest_asyncio: ModuleType | None
try:  # an optional runner of async tests; anyio's plugin (anyio ships it) is the other
    _pytest_asyncio = importlib.import_module("pytest_asyncio")
except ImportError:  # without it, anyio's plugin runs the fixtures
    _pytest_asyncio = None

__all__ = ["DEFAULT_TIME_SCALE", "FAST_POLL", "INSTANT_RETRY", "UnawaitedJobsWarning", "poll_for"]

DEFAULT_TIME_SCALE = 0.01
"""The emulator's default time scale in these fixtures."""

FAST_POLL = PollPolicy(
    first_poll_delay=0.02,
    min_interval=0.02,
    max_interval=0.2,
    max_estimate_wait=0.2,
    batch_fill_horizon=0.02,
    unknown_key_grace=2.0,
)
"""Polling for jobs of tenths of a second (the emulator at its default scale here)."""

INSTANT_RETRY = RetryPolicy(initial_wait=0.0, max_wait=0.05, max_attempts=8)
"""Retries without waiting: faults cost a test no time."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "wujie_emulator(**settings): EmulatorConfig settings of the wujie_emulator fixture, "
        "e.g. time_scale=0.05 or faults=FaultConfig(fail_jobs=0.5)",
    )


_Fixture = TypeVar("_Fixture", bound=Callable[..., Any])


def _async_fixture(function: _Fixture) -> _Fixture:
    # Async fixtures run on the loop of whichever plugin runs the test: anyio's takes every
    # async fixture of a test that has its `anyio_backend` (a test marked anyio), pytest-asyncio
    # those it knows of (`pytest_asyncio.fixture`, or any in its auto mode) for the tests it runs.
    # Asking for `anyio_backend` here would hand them to anyio's loop in a test pytest-asyncio
    # runs on its own: a client bound to another loop than the test's.
    fixture = pytest.fixture if _pytest_asyncio is None else _pytest_asyncio.fixture
    return cast(_Fixture, fixture(function))


def _check_runner(request: pytest.FixtureRequest) -> None:
    """Skip a test on another anyio backend than asyncio; refuse a test that two plugins run."""
    if "anyio_backend" not in request.fixturenames:
        _check_loop_scopes(request)  # pytest-asyncio runs this test and its fixtures
        return
    anyio_backend = request.getfixturevalue("anyio_backend")
    backend = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]
    if backend != "asyncio":
        pytest.skip(
            "wujie_async runs on asyncio (aiohttp): this test's anyio backend is " + backend
        )
    if (
        request.config.pluginmanager.hasplugin("asyncio")
        and request.node.get_closest_marker("asyncio") is not None
    ):
        raise pytest.UsageError(
            "this test is marked anyio, and pytest-asyncio runs it too (it is marked asyncio, "
            "or asyncio_mode is auto): anyio's plugin runs its async fixtures, so wujie_client "
            "would be bound to another event loop than the test's. Let one plugin run it: drop "
            "@pytest.mark.anyio (pytest-asyncio then runs wujie_emulator and wujie_client too), "
            "or keep it and set asyncio_mode = strict"
        )


def _ini(config: pytest.Config, name: str) -> str | None:
    try:
        value = config.getini(name)
    except ValueError:  # an option this pytest-asyncio does not have
        return None
    return value if isinstance(value, str) and value else None


def _check_loop_scopes(request: pytest.FixtureRequest) -> None:
    """Refuse a test whose loop is not the one pytest-asyncio runs these fixtures on.

    These fixtures are per test and run on the loop of ``asyncio_default_fixture_loop_scope``
    (by default the test's own, ``function``); a test runs on the loop of its
    ``@pytest.mark.asyncio(loop_scope=...)``, else of ``asyncio_default_test_loop_scope``
    (``function``). When the two differ, the client belongs to another loop than the test's,
    and its first call raised only "this client belongs to another event loop".
    """
    marker = request.node.get_closest_marker("asyncio")
    if marker is None or not request.config.pluginmanager.hasplugin("asyncio"):
        return  # not a test pytest-asyncio runs (a sync test asking for the fixtures)
    config = request.config
    fixture_setting = _ini(config, "asyncio_default_fixture_loop_scope")
    fixture_scope = fixture_setting or "function"
    if fixture_scope == "fixture-scope":  # the fixture's own scope: these are per test
        fixture_scope = "function"
    marked = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
    test_scope = (
        marked
        if isinstance(marked, str)
        else _ini(config, "asyncio_default_test_loop_scope") or "function"
    )
    if fixture_scope == test_scope:
        return
    told = (
        f"asyncio_default_fixture_loop_scope = {fixture_setting!r}"
        if fixture_setting is not None
        else "asyncio_default_fixture_loop_scope unset"
    )
    test_told = (
        f'@pytest.mark.asyncio(loop_scope="{test_scope}")'
        if isinstance(marked, str)
        else f"asyncio_default_test_loop_scope = {test_scope!r}"
    )
    raise pytest.UsageError(
        f"pytest-asyncio runs wujie_emulator and wujie_client on its {fixture_scope}-scoped "
        f"event loop ({told}) and this test on its {test_scope}-scoped one ({test_told}): "
        "wujie_client would belong to another event loop than the test's. Run them on one "
        f'loop: set asyncio_default_fixture_loop_scope = "{test_scope}" (the wujie fixtures '
        f"are per test, on any loop), or run the test on the {fixture_scope}-scoped loop "
        f'(asyncio_default_test_loop_scope = "{fixture_scope}", or '
        f'@pytest.mark.asyncio(loop_scope="{fixture_scope}"))'
    )


@_async_fixture
async def wujie_emulator(request: pytest.FixtureRequest) -> AsyncIterator[Emulator]:
    """An emulator of the gateway on loopback, for this test (see the module docstring)."""
    _check_runner(request)
    settings: dict[str, Any] = {"time_scale": DEFAULT_TIME_SCALE, "seed": 0}
    # Markers of the module, the class and the test add up, the closest one's value winning
    # for a setting given twice: a test's own marker (faults=...) took the place of its
    # module's (time_scale=0.05), whose settings were then silently dropped.
    for marker in reversed(list(request.node.iter_markers("wujie_emulator"))):
        if marker.args:
            raise pytest.UsageError(
                "@pytest.mark.wujie_emulator takes EmulatorConfig settings by name "
                f"(time_scale=0.05), not by position: got {marker.args!r}"
            )
        settings |= marker.kwargs
    if isinstance(settings.get("faults"), dict):
        try:
            settings["faults"] = fault_config_from_mapping(settings["faults"])
        except InvalidRequestError as exc:  # named as faults=FaultConfig(...) names them
            raise InvalidRequestError(
                [(f"faults.{field}", rule) for field, rule in exc.violations]
            ) from None
    try:
        config = EmulatorConfig(**settings)
    except TypeError as exc:  # an unknown name
        raise pytest.UsageError(f"@pytest.mark.wujie_emulator: {exc}") from None
    async with Emulator(config) as emulator:
        yield emulator


def poll_for(time_scale: float) -> PollPolicy:
    """:data:`FAST_POLL` for an emulator at ``time_scale``: its waits grow with the scale
    (jobs last that much longer), up to the defaults a user gets (``PollPolicy()``)."""
    factor = time_scale / DEFAULT_TIME_SCALE
    if factor <= 1.0:
        return FAST_POLL
    default = PollPolicy()
    names = (
        "first_poll_delay",
        "min_interval",
        "max_interval",
        "max_estimate_wait",
        "batch_fill_horizon",
        "unknown_key_grace",
    )
    return dataclasses.replace(
        FAST_POLL,
        **{name: min(getattr(FAST_POLL, name) * factor, getattr(default, name)) for name in names},
    )


# Set on a test whose body failed: its jobs left running are no news then.
_TEST_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if call.when == "call" and call.excinfo is not None:
        item.stash[_TEST_FAILED] = True
    return report


class UnawaitedJobsWarning(pytest.PytestWarning):
    """A test ended with jobs of ``wujie_client`` still running: nobody awaited them (their
    results, or their errors, went unseen); closing the client cancels them."""


@_async_fixture
async def wujie_client(
    request: pytest.FixtureRequest, wujie_emulator: Emulator
) -> AsyncIterator[WujieClient]:
    """An open client bound to ``wujie_emulator`` (see the module docstring). A test that passes
    with jobs still running (submitted and never awaited) gets an :class:`UnawaitedJobsWarning`
    naming them."""
    async with WujieClient(
        wujie_emulator.credentials,
        base_url=wujie_emulator.base_url,
        poll=poll_for(wujie_emulator.gateway.config.time_scale),
        retry=INSTANT_RETRY,
    ) as client:
        yield client
        running = client.jobs()
        if running and not request.node.stash.get(_TEST_FAILED, False):
            keys = some_and_more([job.key for job in running], 5)
            warnings.warn(
                UnawaitedJobsWarning(
                    f"{request.node.nodeid} ended with {len(running)} job(s) of wujie_client "
                    f"still running ({keys}): await them (or job.cancel() those the "
                    "test leaves on purpose); closing the client cancels them"
                ),
                stacklevel=1,
            )
