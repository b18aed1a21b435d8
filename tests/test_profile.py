"""gateway.profile: a profile's defaults go under what the configuration sets itself,
and "small" keeps Python's own garbage-collector thresholds."""

from __future__ import annotations

import gc

import pytest

from gatewayd.core.config import load_config
from gatewayd.core.profile import PROFILES
from gatewayd.core.runtime import tune_gc_for
from gatewayd.core.schema import ConfigErrors

UPSTREAMS = '[[upstream]]\nname = "a"\nurl = "http://a"\n\n[[upstream]]\nname = "b"\nurl = "http://b"\nmax_records = 7\n'


def test_the_default_profile_changes_nothing():
    assert load_config(None, [], text=UPSTREAMS) == load_config(None, ["gateway.profile='default'"], text=UPSTREAMS)


def test_small_sets_its_defaults_and_the_config_wins():
    config = load_config(None, ["gateway.profile='small'", "storage.readers=3"], text=UPSTREAMS)
    small = PROFILES["small"]
    assert config.storage.readers == 3  # set in the config: kept
    assert config.storage.group_commit_max == small["storage"]["group_commit_max"]
    assert [u.max_records for u in config.upstream] == [small["upstream"]["max_records"], 7]
    assert {u.max_bytes for u in config.upstream} == {small["upstream"]["max_bytes"]}
    assert config.live.ring_size == small["live"]["ring_size"]


def test_an_unknown_profile_is_named():
    with pytest.raises(ConfigErrors) as e:
        load_config(None, ["gateway.profile='tiny'"])
    assert "gateway.profile: expected one of 'default', 'small', got 'tiny' (string)" in str(e.value)


def test_small_keeps_pythons_gc_thresholds_the_default_relaxes_them():
    before = gc.get_threshold()
    try:
        tune_gc_for("default")
        assert gc.get_threshold()[0] == 50_000
        tune_gc_for("small")
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
