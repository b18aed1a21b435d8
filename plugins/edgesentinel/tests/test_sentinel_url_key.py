"""The firmware URL-signing key file under damage: a stale temporary file of another mode,
an empty or short file, a key file others can read."""

from __future__ import annotations

import os
import stat

from gatewayd_edgesentinel.state import URL_KEY, url_key


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_stale_world_readable_temporary_file_does_not_make_the_key_readable(tmp_path):
    stale = tmp_path / (URL_KEY + ".tmp")
    stale.write_bytes(b"half")
    os.chmod(stale, 0o644)  # left by a crash, or an older release, or a restore
    key = url_key(tmp_path)
    assert len(key) == 32 and (tmp_path / URL_KEY).read_bytes() == key
    assert mode(tmp_path / URL_KEY) == 0o600


def test_an_empty_or_short_key_is_replaced_and_a_good_one_kept(tmp_path):
    (tmp_path / URL_KEY).write_bytes(b"")
    first = url_key(tmp_path)
    assert len(first) == 32 and mode(tmp_path / URL_KEY) == 0o600
    assert url_key(tmp_path) == first
    (tmp_path / URL_KEY).write_bytes(first[:7])
    assert url_key(tmp_path) not in (first, first[:7])


def test_a_kept_key_that_others_can_read_is_made_private(tmp_path):
    key = url_key(tmp_path)
    os.chmod(tmp_path / URL_KEY, 0o644)
    assert url_key(tmp_path) == key and mode(tmp_path / URL_KEY) == 0o600
