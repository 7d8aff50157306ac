"""``retain_freed_memory``: after it, a freed block stays in the process (RSS does not fall) where
glibc's default hands it back to the OS. Each case runs in a fresh interpreter: the setting is
process-wide and cannot be undone."""
import json
import os
import subprocess
import sys

import pytest

from metakernels.memory import ENV_VARS, _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only (Linux)")

PROBE = r"""
import json, sys
import torch
from metakernels.memory import retain_freed_memory, allocator_state

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

state = retain_freed_memory() if sys.argv[1] == "retain" else allocator_state()
x = torch.rand(3 * 2 ** 20)            # 12 MiB of fresh random values, every page touched
held = rss()
del x
print(json.dumps({"state": state, "returned_mb": (held - rss()) / 2 ** 20}))
"""


def probe(mode, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_default_glibc_returns_a_freed_block_to_the_os():
    r = probe("default")
    assert r["state"] == "default"
    assert r["returned_mb"] > 10


def test_retain_keeps_a_freed_block_in_the_process():
    r = probe("retain")
    assert r["state"] == "retain"
    assert r["returned_mb"] < 2


def test_glibc_settings_from_the_environment_are_left_alone():
    r = probe("retain", MALLOC_MMAP_THRESHOLD_="131072")
    assert r["state"] == "env"
    assert r["returned_mb"] > 10        # the environment's 128 KiB threshold: mmap, then munmap


def test_trainer_config_key_defaults_on():
    from metakernels.config import Config, load_config
    assert Config().trainer.retain_freed_memory is True
    assert load_config(None, ["trainer.retain_freed_memory=false"]).trainer.retain_freed_memory \
        is False
