"""An emulator of the Wujie "OpenAI Image" gateway, served over real HTTP on loopback.

It verifies RSA signatures, validates requests with the per-model rules, runs jobs that take
time (a seeded latency model scaled by ``time_scale``), serves real PNGs, injects faults on
demand and counts everything. Use it to test code that talks to the gateway::

    from wujie_async.emulator import Emulator, EmulatorConfig

    async with Emulator(EmulatorConfig(time_scale=0.01)) as emu:
        ...  # emu.base_url, emu.credentials, emu.stats()
"""

from ._app import Gateway
from ._options import fault_config_from_mapping, fault_config_from_pairs
from ._png import DOWNSCALE
from ._server import Emulator, add_arguments, main, run
from ._state import TYPICAL_SECONDS, EmulatorConfig, FaultConfig

__all__ = [
    "DOWNSCALE",
    "TYPICAL_SECONDS",
    "Emulator",
    "EmulatorConfig",
    "FaultConfig",
    "Gateway",
    "add_arguments",
    "fault_config_from_mapping",
    "fault_config_from_pairs",
    "main",
    "run",
]
