"""CPU time spent by the gateway (this process, and its trio thread) and by mosquitto.

On a loaded machine a rate says how much of the CPU the bench got, not how much the
gateway needs: the CPU time per stored message does not depend on the load (much), so
the MQTT benches print it next to their rates. Linux only (/proc); elsewhere the
figures are left out.

    meter = CpuMeter(broker_pid)      # before the measured part
    ...
    used = meter.stop()               # Cpu(process, trio thread, broker), seconds
    print(used.per_message(n))
"""

from __future__ import annotations

import os
import statistics
import threading
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(path: str) -> float | None:
    """utime + stime of /proc/.../stat, in seconds."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_cpu() -> float:
    """This process's CPU time (every thread), in seconds."""
    t = os.times()
    return t.user + t.system


def thread_cpu(native_id: int) -> float | None:
    """One thread of this process (its native id), in seconds."""
    return _proc_cpu(f"/proc/self/task/{native_id}/stat")


@dataclass
class Cpu:
    process: float  # the gateway's process, every thread (s)
    trio: float | None  # its trio thread alone
    broker: float | None  # mosquitto

    def per_message(self, count: int) -> str:
        def us(s: float | None) -> str:
            return "   n/a" if s is None else f"{s / count * 1e6:6.1f}"

        return f"gateway {us(self.process)} µs (trio thread {us(self.trio)})  mosquitto {us(self.broker)} µs / msg"


class CpuMeter:
    """Started on the trio thread (the thread it measures as "trio")."""

    def __init__(self, broker_pid: int | None = None) -> None:
        self.tid = threading.get_native_id()
        self.broker_path = None if broker_pid is None else f"/proc/{broker_pid}/stat"
        self.start = self._now()

    def _now(self) -> Cpu:
        return Cpu(process_cpu(), thread_cpu(self.tid),
                   None if self.broker_path is None else _proc_cpu(self.broker_path))

    def stop(self) -> Cpu:
        end = self._now()

        def diff(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        return Cpu(end.process - self.start.process, diff(self.start.trio, end.trio),
                   diff(self.start.broker, end.broker))


def median_cpu(runs: list[Cpu]) -> Cpu:
    """Each figure's median over the runs."""
    def med(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else statistics.median(v for v in values if v is not None)

    return Cpu(statistics.median(c.process for c in runs), med([c.trio for c in runs]), med([c.broker for c in runs]))
