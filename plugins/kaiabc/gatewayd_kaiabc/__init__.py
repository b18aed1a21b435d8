"""gatewayd plugin for KaiABC oscillator sensor nodes.

Read top to bottom: config, models, routes, topics, serial, tasks, events. This
release ships the oscillator engine (`gatewayd_kaiabc.engine`: the Rust et al. 2007
KaiC model, vectorized integrators, temperature entrainment, PRC, Kalman filter) and
its commands (`gatewayd kaiabc simulate | q10 | prc`). The device-facing HTTP and
WebSocket API of the specification comes in a later release.
"""

from gatewayd.plugins.api import CommandRegistry, hookimpl

__version__ = "0.1.0"


# -- command line ------------------------------------------------------------------


@hookimpl
def gatewayd_cli_commands(commands: CommandRegistry) -> None:
    from .commands import add_commands  # numpy and scipy load only for these commands

    add_commands(commands)
