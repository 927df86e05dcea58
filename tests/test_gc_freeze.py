"""WujieClient(gc_freeze=True): an opt-in, undone when the client closes."""

from __future__ import annotations

import gc

import pytest

from wujie_async._gc_freeze import FREEZE_EVERY

from .conftest import EmulatorFactory, make_client


@pytest.mark.anyio
async def test_gc_freeze_is_opt_in_and_undone_on_close(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        async with make_client(emu) as client:
            for index in range(FREEZE_EVERY):
                client.images.attach(f"key-{index}")
            assert gc.get_freeze_count() == 0  # not asked for: never frozen
        async with make_client(emu, gc_freeze=True) as client:
            assert gc.get_freeze_count() > 0  # frozen on open
        assert gc.get_freeze_count() == 0
        async with make_client(emu, gc_freeze=True) as client:
            opened = gc.get_freeze_count()
            for index in range(FREEZE_EVERY):
                client.images.attach(f"key-{index}")
            assert gc.get_freeze_count() > opened  # the new jobs were frozen as they piled up
        assert gc.get_freeze_count() == 0


@pytest.mark.anyio
async def test_a_pending_job_is_three_objects_the_collector_tracks(
    emulator: EmulatorFactory,
) -> None:
    """The job, its future and the poller's record of it, as FREEZE_EVERY counts them: the
    job's changing fields were a fourth object (its state), which every full collection walked
    too, 100,000 times over with 100,000 jobs pending."""
    jobs = 1000
    async with emulator() as emu, make_client(emu) as client:
        gc.collect()
        before = len(gc.get_objects())
        held = [client.images.attach(f"key-{index}") for index in range(jobs)]
        gc.collect()  # untracks what holds no containers (the heap's (due, key) entries)
        per_job = (len(gc.get_objects()) - before) / jobs
        assert len(held) == jobs
        assert 3 <= per_job < 3.1, per_job
