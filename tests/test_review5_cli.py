"""A JSON argument with bytes that are not UTF-8: Python hands argv over with them as lone
surrogates (surrogateescape). `gatewayd devices` must name the argument, exit 1, store nothing."""

from __future__ import annotations

import json

from .test_cli_devices import gatewayd_inproc


def test_a_json_argument_with_undecodable_bytes_is_named_and_nothing_stored(tmp_path, capsys):
    gatewayd_inproc(tmp_path, capsys, "devices", "add", "--family", "kaiabc", "--id", "n1")
    metadata = b'{"v": "\xff"}'.decode("utf-8", "surrogateescape")  # what sys.argv holds for these bytes
    r = gatewayd_inproc(tmp_path, capsys, "devices", "add", "--family", "kaiabc", "--id", "n2", "--metadata", metadata,
                        check=False)
    assert r.returncode == 1 and "--metadata is not valid JSON: v: a lone surrogate" in r.stderr, r.stderr[-400:]
    r = gatewayd_inproc(tmp_path, capsys, "devices", "command", "n1", metadata, check=False)
    assert r.returncode == 1 and "not valid JSON: v: a lone surrogate" in r.stderr, r.stderr[-400:]
    listed = json.loads(gatewayd_inproc(tmp_path, capsys, "devices", "list", "--json").stdout)["devices"]
    assert [d["id"] for d in listed] == ["n1"]
