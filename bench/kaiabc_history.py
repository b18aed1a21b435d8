"""kaiabc's oscillator history on disk: bytes per node per day, and the bound it keeps.

    .venv/bin/python bench/kaiabc_history.py [--nodes 200]

One simulated day of samples for `--nodes` nodes at the default `history_every_s` (60 s)
into the plugin's own table (`gatewayd_kaiabc.models`, real SQLite, its indexes), then
the same day thinned as the plugin thins history older than `history_full_days` (one
sample per `history_coarse_s`, 600 s); SQLite's pages counted after each (VACUUM), so
the figures are what the table and its indexes occupy. With them, the steady-state size
per node under the defaults (1 day full, 29 days thinned).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import peewee

try:
    import gatewayd_kaiabc  # noqa: F401
except ImportError:  # a checkout without the plugin installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "plugins" / "kaiabc"))

from gatewayd_kaiabc.config import KaiabcConfig  # noqa: E402
from gatewayd_kaiabc.models import Store, named  # noqa: E402


def size(db: peewee.SqliteDatabase) -> int:
    db.execute_sql("VACUUM")
    pages = db.execute_sql("PRAGMA page_count").fetchone()[0]
    return int(pages * db.execute_sql("PRAGMA page_size").fetchone()[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=200)
    args = ap.parse_args(argv)
    config = KaiabcConfig()
    with tempfile.TemporaryDirectory() as tmp:
        db = peewee.SqliteDatabase(f"{tmp}/h.sqlite3")
        tables = named("kaiabc")
        db.bind(tables)
        db.create_tables(tables)
        empty = size(db)
        store = Store()
        rng = np.random.default_rng(1)
        start = 1_767_225_600.0
        with db.atomic():
            for ts in np.arange(start, start + 86400, config.history_every_s):
                y = rng.uniform(0.1, 1.5, (3, args.nodes))
                store.add_history([(f"pico_{i:04d}", float(ts), *y[:, i].tolist(), float(rng.uniform()),
                                    float(rng.uniform(298, 308)), float((ts - start) / 3600)) for i in range(args.nodes)])
        full = (size(db) - empty) / args.nodes
        with db.atomic():
            store.thin_history(start, start + 86400, config.history_coarse_s)
        thinned = (size(db) - empty) / args.nodes
        kept = db.execute_sql("SELECT COUNT(*) FROM kaiabc_history").fetchone()[0] / args.nodes
    steady = full * config.history_full_days + thinned * (config.history_days - config.history_full_days)
    print(f"kaiabc history, {args.nodes} nodes, one day (table and indexes, after VACUUM):")
    print(f"  full resolution ({config.history_every_s:.0f} s): {full / 1024:8.1f} KiB per node per day "
          f"({86400 / config.history_every_s:.0f} samples)")
    print(f"  thinned ({config.history_coarse_s:.0f} s):        {thinned / 1024:8.1f} KiB per node per day "
          f"({kept:.0f} samples)")
    print(f"  steady state, defaults ({config.history_full_days:g} d full + "
          f"{config.history_days - config.history_full_days:g} d thinned): {steady / 2**20:.2f} MiB per node, "
          f"{steady * 10_000 / 2**30:.1f} GiB for 10,000 nodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
