"""Upgrades cannot lose data: a database written by an earlier gatewayd (a fixture made
by scripts/make-upgrade-fixture from that revision) is copied before it is migrated,
then migrated, and everything in it still works: devices log in with their old keys,
pending records go upstream, old rows are readable. A migration that fails leaves its
tables as they were and says how to roll back; without the copy, nothing is migrated."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import peewee
import pytest

from gatewayd import __version__
from gatewayd.core.mqtt.client import RejectedMessage
from gatewayd.plugins.api import hookimpl
from gatewayd.testing import gw_client

FIXTURES = Path(__file__).parent / "fixtures" / "upgrade"
REPO = Path(__file__).resolve().parent.parent


def _schema(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT component, version FROM core_schema"))


def _columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _restore(fixture: str, data: Path) -> dict:
    data.mkdir(parents=True, mode=0o700)
    for name in ("gatewayd.sqlite3", "master.key"):
        shutil.copy(FIXTURES / fixture / name, data / name)
        (data / name).chmod(0o600)
    return json.loads((FIXTURES / fixture / "manifest.json").read_text())


async def test_a_database_of_the_previous_release_is_copied_then_upgraded(gateway_factory, upstream_receiver,
                                                                         tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "upgrade-test-token")
    data = tmp_path / "var"
    manifest = _restore("v0-mqtt1", data)
    before = _schema(data / "gatewayd.sqlite3")
    assert before["core_mqtt"] == 1 and "sender" not in _columns(data / "gatewayd.sqlite3", "core_mqtt_rejected")
    async with gateway_factory(mqtt=True, upstream=upstream_receiver) as gw:
        # The copy from before the migration: the old schema, every row, checked.
        copy = gw.storage.pre_migration_backup
        assert copy is not None and copy.parent == data / "backups" and copy.name.startswith("gatewayd-pre-upgrade-")
        copied = _schema(copy)  # components new in this release may have made their tables already
        assert {k: copied[k] for k in before} == before
        with sqlite3.connect(copy) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("SELECT count(*) FROM core_outbox").fetchone()[0] == manifest["records"]
        # Migrated: the new columns, the old row kept.
        assert gw.storage.schema_version("core_mqtt") == 2
        rejected = await gw.storage.read(lambda: [(r.topic, r.reason, r.sender) for r in RejectedMessage.select()])
        assert rejected == [("legacy/dev-1/data", "not JSON", None)]
        # Devices log in with the keys they were given before the upgrade (the master key
        # decrypts what the old release encrypted).
        for device in manifest["devices"]:
            found = await gw.devices.registry.verify_key("legacy", device["key"], device["device_id"])
            assert found is not None and found.id == device["device_id"]
            _, signing = await gw.devices.registry.signing_secrets("legacy", device["device_id"])
            assert signing == [device["signing_secret"]]
        assert await gw.devices.registry.verify_key("legacy", "not-the-key", "dev-0") is None
        # What was waiting in the outbox goes upstream, unchanged.
        records = await upstream_receiver.wait_for(manifest["records"])
        assert sorted(r["data"]["n"] for r in records) == list(range(manifest["records"]))
        async with gw_client(gw) as client:
            r = await client.get("/api/gateway/events", headers={"Authorization": "Bearer upgrade-test-token"})
        assert [(e["type"], e["device_id"]) for e in r.json()["events"]] == [("door_open", "dev-0")]


class Note(peewee.Model):
    text = peewee.TextField()

    class Meta:
        table_name = "notes_note"


class NotesV1:
    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(Note)


class NotesV2Broken:
    """Version 2 adds a column, then its migration fails halfway."""

    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(Note)
        models.version = 2
        models.migrations[2] = self.migrate

    @staticmethod
    def migrate(migrator, db):
        from playhouse.migrate import migrate

        migrate(migrator.add_column("notes_note", "lang", peewee.TextField(default="en")))
        raise ValueError("a bug in step 2")


async def test_a_failed_migration_leaves_the_tables_as_they_were_and_says_how_to_roll_back(gateway_factory, tmp_path):
    db = tmp_path / "var" / "gatewayd.sqlite3"
    async with gateway_factory(plugins=[("notes", NotesV1())]) as gw:
        await gw.storage.write(lambda: Note.insert_many([{"text": "a"}, {"text": "b"}]).execute())
    async with gateway_factory(plugins=[("notes", NotesV2Broken())]) as gw:
        state = gw.health.plugins["notes"]
        assert state.state == "failed"
        copy = gw.storage.pre_migration_backup
        assert copy is not None and copy.exists()
        assert "migrating schema version 1 to 2 failed (ValueError: a bug in step 2)" in state.reason
        assert "To roll back" in state.reason and str(copy) in state.reason
        async with gw_client(gw) as client:
            assert (await client.get("/health")).status_code == 503
    assert _schema(db)["notes"] == 1
    assert _columns(db, "notes_note") == ["id", "text"]  # the column step 2 added is gone with it
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT text FROM notes_note ORDER BY id").fetchall() == [("a",), ("b",)]
    # And the same release started again (the rollback) runs on it as before.
    async with gateway_factory(plugins=[("notes", NotesV1())]) as gw:
        assert gw.health.plugins["notes"].state == "ok"
        assert await gw.storage.read(lambda: Note.select().count()) == 2


async def test_no_copy_no_migration(gateway_factory, tmp_path):
    db = tmp_path / "var" / "gatewayd.sqlite3"
    async with gateway_factory(plugins=[("notes", NotesV1())]) as gw:
        await gw.storage.write(lambda: Note.insert(text="a").execute())
    (tmp_path / "not-a-folder").write_text("")
    async with gateway_factory(plugins=[("notes", NotesV2Broken())],
                               settings=[f"backup.dir='{tmp_path / 'not-a-folder'}'"]) as gw:
        reason = gw.health.plugins["notes"].reason
        assert "the copy of the database before migrating failed" in reason and "nothing was migrated" in reason
        assert "backup.dir" in reason
    assert _schema(db)["notes"] == 1 and _columns(db, "notes_note") == ["id", "text"]


def test_the_version_and_the_changelog_agree():
    out = subprocess.run([sys.executable, "-m", "gatewayd", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"gatewayd {__version__}"
    changelog = (REPO / "CHANGELOG.md").read_text()
    first = next(line for line in changelog.splitlines() if line.startswith("## "))
    assert first.startswith(f"## {__version__} ")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_every_fixture_names_its_revision(fixture):
    revision = (FIXTURES / fixture / "REVISION").read_text().strip()
    assert len(revision) == 40
    manifest = json.loads((FIXTURES / fixture / "manifest.json").read_text())
    assert manifest["records"] > 0 and manifest["devices"]
