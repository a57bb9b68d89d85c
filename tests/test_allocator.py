"""The command line's allocator settings: applied on glibc, never over the user's own."""
import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = ("import json; from defect_fast.allocator import keep_freed_memory, applied; "
         "print(json.dumps([keep_freed_memory(), applied()]))")


def run_probe(**env_changes):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "DEFECT_FAST_MALLOC", "GLIBC_TUNABLES")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_thresholds_are_set_on_glibc_and_recorded():
    got, recorded = run_probe()
    assert got == recorded == {"mmap_threshold": 32 << 20, "trim_threshold": 256 << 20}


@pytest.mark.parametrize("env", [{"DEFECT_FAST_MALLOC": "default"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"MALLOC_MMAP_THRESHOLD_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_the_user_s_own_settings_win(env):
    assert run_probe(**env) == [None, None]
