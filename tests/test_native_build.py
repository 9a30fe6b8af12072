"""The native build's lock: a build killed mid-way leaves torch's `lock` file in the build directory (torch
polls for it to disappear, forever). The next load must notice that nobody holds the build and go on."""

import os
import shutil
import subprocess
import sys

import pytest

from loraplex.adapters import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
LOAD = "from loraplex.adapters import native; assert native.available(), native.error(); print(native.build_dir())"


def test_a_lock_left_by_a_killed_build_does_not_block_the_next_load(tmp_path):
    built = native.build_dir()
    copy = tmp_path / "native" / built.name
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "build.lock"))
    (copy / "lock").touch()            # what a build killed between torch's lock and its release leaves
    env = {**os.environ, "LORAPLEX_CACHE_DIR": str(tmp_path), "LORAPLEX_NATIVE_KERNELS": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(copy)
    assert not (copy / "lock").exists()
    assert "did not finish" in done.stderr
