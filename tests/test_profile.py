"""gateway.profile: a profile's defaults go under what the configuration sets itself,
and "small" keeps Python's own garbage-collector thresholds."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from gatewayd.core.config import load_config
from gatewayd.core.profile import PROFILES
from gatewayd.core.runtime import SMALL_ARENAS, tune_gc_for
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


ARENAS_SCRIPT = r"""
import ctypes, sys, tempfile, threading
from gatewayd.core.runtime import tune_gc_for
tune_gc_for(sys.argv[1])
held, barrier = [], threading.Barrier(6)
def work():
    barrier.wait()
    held.append(bytearray(200_000))  # malloc'd in this thread's arena
threads = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile() as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    print(open(f.name).read().count("<heap nr="))
"""


@pytest.mark.parametrize("profile", ["default", "small"])
def test_small_keeps_two_malloc_arenas_for_many_threads(profile):
    # glibc gives each thread that allocates its own arena (8 per core), each keeping what it
    # freed: the storage readers and trio's worker threads add up on a 512 MB board.
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", ARENAS_SCRIPT, profile], env=env, capture_output=True, text=True,
                         check=True).stdout
    heaps = int(out)
    if profile == "small":
        assert heaps <= SMALL_ARENAS, out
    else:
        assert heaps > SMALL_ARENAS, out  # glibc's own limit: what the small profile changes
