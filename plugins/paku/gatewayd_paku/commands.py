"""paku's commands down: queued by the core (`ctx.commands`), published on
`<name>/<id>/cmd` to devices that are online, answered on `event/ack` or with a state's
`cmdAck`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from gatewayd.plugins.api import PluginContext

from .messages import Ack, render_command

if TYPE_CHECKING:
    from .config import PakuConfig
    from .topics import Paku


class Commands:
    """Publishes a device's pending commands when it comes online, when one is queued,
    and every `command_retry_s`; records the device's acks."""

    def __init__(self, ctx: PluginContext[PakuConfig, Paku], is_online: Callable[[str], bool]) -> None:
        self.ctx = ctx
        self.is_online = is_online
        self.counts = ctx.metrics.counter("commands_total", "commands published and answered", ("result",))
        self._wake, self._woken = trio.open_memory_channel[str](1024)

    def wake(self, device_id: str) -> None:
        """Ask the push task to publish the device's pending commands."""
        try:
            self._wake.send_nowait(device_id)
        except trio.WouldBlock:
            pass  # the periodic sweep will find them

    async def run(self) -> None:
        """The background task: push to the devices woken, or to every device with a
        pending command after `command_retry_s` of quiet."""
        while True:
            due: set[str] = set()
            with trio.move_on_after(self.ctx.config.command_retry_s):
                due.add(await self._woken.receive())
            if not due:
                due = {c.device_id for c in await self.ctx.commands.list(status="pending", limit=1000)}
            while True:
                try:
                    due.add(self._woken.receive_nowait())
                except trio.WouldBlock:
                    break
            for device_id in sorted(due):
                await self.push(device_id)

    async def push(self, device_id: str) -> int:
        """Publish the device's pending commands if it is online; how many went out."""
        if not self.is_online(device_id) or not self.ctx.mqtt.connected:
            return 0  # they stay pending; pushed when the device is heard from
        topic = f"{self.ctx.name}/{device_id}/cmd"
        try:
            sent = await self.ctx.commands.push(device_id, topic, render=render_command)
        except Exception as e:  # broker gone mid-push: the rest stays pending for the next try
            self.ctx.log.warning("command push failed", device=device_id, error=repr(e))
            return 0
        if sent:
            self.counts.inc(sent, result="published")
            self.ctx.log.info("commands published", device=device_id, count=sent)
        return sent

    async def ack(self, device_id: str, ack: Ack) -> str | None:
        """Record the device's answer; the command's new status, None if it has no such command."""
        command = await self.ctx.commands.ack(ack.id, ack.ok, ack.result, device_id=device_id)
        if command is None:
            return None
        self.counts.inc(result="executed" if ack.ok else "failed")
        return command.status
