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
