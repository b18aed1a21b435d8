"""Request validation: our declaration layer (msgspec) against pydantic, the library
quart-schema validates with, on the same body and the same rules.

    pip install --target /tmp/pydlib pydantic==2.14.3   # not a dependency of the gateway
    PYTHONPATH=/tmp/pydlib python bench/validate_bench.py [--runs 7] [--ops 20000]

Issue 16 asks for a library (such as quart-schema) unless it costs too much on the hot
path. What a request pays, per body, both ways:

- ours: `parse_json` (strict: NaN, Infinity, depth and 64-bit range refused) then
  `convert(doc, NewDevice)` (gatewayd.protocol.validate, msgspec underneath): what a
  declared route runs before its handler;
- pydantic: `NewDeviceModel.model_validate_json(raw)`, the same fields and constraints
  (patterns, lengths, defaults, unknown fields forbidden), as quart-schema would run it;
- and a refused body (a wrong type deep in it), both ways, for the error path.

Both sides are first checked to agree on what they accept and refuse. Medians over the
runs; ratio = pydantic's time / ours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gatewayd.core.devices.http import NewDevice  # noqa: E402
from gatewayd.protocol.strict_json import BadJSON, parse_json  # noqa: E402
from gatewayd.protocol.validate import convert  # noqa: E402

GOOD = (b'{"family": "paku", "id": "IMEI:351234567890123", "name": "pump house 3", "model": "pk-200",'
        b' "firmware": "1.4.2", "metadata": {"site": "north", "floor": 2, "tags": ["a", "b"]},'
        b' "key": "k3y-0123456789abcdef0123"}')
BAD = GOOD.replace(b'"name": "pump house 3"', b'"name": ["pump", 3]')


def pydantic_model() -> Any:
    try:
        from pydantic import BaseModel, ConfigDict, Field
    except ImportError:
        sys.exit("pydantic is not installed: see this file's docstring")

    class NewDeviceModel(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
        family: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
        id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")] | None = None
        name: Annotated[str, Field(max_length=200)] = ""
        model: Annotated[str, Field(max_length=200)] = ""
        firmware: Annotated[str, Field(max_length=200)] = ""
        metadata: dict[str, Any] = {}
        key: Annotated[str, Field(min_length=16, max_length=256, pattern=r"^[!-~]+$")] | None = None
        signing_secret: Annotated[str, Field(min_length=16, max_length=256, pattern=r"^[!-~]+$")] | None = None

    return NewDeviceModel


def ours(raw: bytes) -> Any:
    return convert(parse_json(raw), NewDevice)


def timed(fn: Any, raw: bytes, ops: int) -> float:
    """Microseconds per call, refusals included."""
    began = time.perf_counter()
    for _ in range(ops):
        try:
            fn(raw)
        except (BadJSON, ValueError):
            pass
    return (time.perf_counter() - began) / ops * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ops", type=int, default=20000)
    args = parser.parse_args()
    model = pydantic_model()
    theirs = model.model_validate_json
    assert ours(GOOD).id == theirs(GOOD).id == "IMEI:351234567890123"
    for bad in (BAD, b'{"family": "paku", "extra": 1}', b'{"family": "Paku"}', b'{"family": "paku", "x": NaN}'):
        for fn in (ours, theirs):
            try:
                fn(bad)
            except (BadJSON, ValueError):
                continue
            raise AssertionError(f"{fn} accepted {bad!r}")
    rows = []
    for label, raw in (("a valid body", GOOD), ("a refused body", BAD)):
        mine = [timed(ours, raw, args.ops) for _ in range(args.runs)]
        lib = [timed(theirs, raw, args.ops) for _ in range(args.runs)]
        rows.append((label, statistics.median(mine), statistics.median(lib)))
    print(f"NewDevice ({len(GOOD)} bytes), {args.ops} calls x {args.runs} runs, medians; pydantic "
          f"{sys.modules['pydantic'].VERSION}")
    for label, mine_us, lib_us in rows:
        print(f"{label:16s}  ours (parse_json + msgspec) {mine_us:6.2f} us   pydantic {lib_us:6.2f} us"
              f"   ratio {lib_us / mine_us:4.2f}x")


if __name__ == "__main__":
    main()
