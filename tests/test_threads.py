"""Torch's thread count: usable cores shared among local ranks, never over a user's or launcher's setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mergekit_lite.threads import cgroup_cpu_limit, default_threads, default_wait_policy, local_world_size, usable_cores


@pytest.mark.parametrize("cores, local, env, expected", [
    (2, 1, {}, 2),                                   # one process: every usable core
    (2, 2, {}, 1),                                   # torchrun/accelerate launch, 2 ranks on 2 cores
    (16, 4, {}, 4),
    (2, 4, {}, 1),                                   # more ranks than cores: still one thread each
    (8, 3, {}, 2),                                   # rounds down: 3 x 2 <= 8
    (2, 1, {"OMP_NUM_THREADS": "2"}, None),          # the user's (or accelerate's) choice stands
    (2, 2, {"OMP_NUM_THREADS": "4"}, None),
    (2, 1, {"MKL_NUM_THREADS": "1"}, None),
    (4, 1, {"OMP_NUM_THREADS": ""}, 4),              # set but empty counts as unset
])
def test_default_threads(cores, local, env, expected):
    assert default_threads(cores, local, env) == expected


def test_default_wait_policy():
    assert default_wait_policy({}) == "PASSIVE"  # idle threads sleep: a busy neighbour core costs little
    for var, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000"), ("KMP_BLOCKTIME", "0")):
        assert default_wait_policy({var: value}) is None


def test_local_world_size_from_launchers():
    assert local_world_size({}) == 1
    assert local_world_size({"LOCAL_WORLD_SIZE": "2"}) == 2           # torchrun, accelerate launch
    assert local_world_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}) == 3  # Open MPI
    assert local_world_size({"LOCAL_WORLD_SIZE": "x"}) == 1


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 2.0
    assert cgroup_cpu_limit(tmp_path / "none") is None
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


# Runs moemerge's own entry point on a real command, then reports the thread count torch ended up with.
PROBE = ("import atexit, os, sys; from mergekit_lite.cli import main; "
         "atexit.register(lambda: print(os.environ.get('OMP_WAIT_POLICY'), 'THREADS', "
         "__import__('torch').get_num_threads())); "
         "sys.argv = ['moemerge', 'inspect', sys.argv[1]]; main()")


def _moemerge_settings(model, **env_over) -> tuple[str, int]:
    """(OMP_WAIT_POLICY, torch's thread count) at the end of `moemerge inspect MODEL` run with `env_over`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_over)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(model)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    policy, _, threads = proc.stdout.split()[-3:]
    return policy, int(threads)


def _threads_after_moemerge(model, **env_over) -> int:
    return _moemerge_settings(model, **env_over)[1]


def test_moemerge_sets_threads_unless_user_did(pico_llama):
    cores = usable_cores()
    # two local ranks share the cores: each gets half (torch alone would take them all)
    assert _threads_after_moemerge(pico_llama, LOCAL_WORLD_SIZE="2") == max(1, cores // 2)
    assert _threads_after_moemerge(pico_llama) == cores
    # the user's setting is left alone, even where moemerge would choose otherwise (torch caps it at the cores)
    assert _threads_after_moemerge(pico_llama, OMP_NUM_THREADS="1") == 1
    assert _threads_after_moemerge(pico_llama, LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="2") == min(2, cores)


def test_moemerge_sets_passive_wait_unless_user_did(pico_llama):
    assert _moemerge_settings(pico_llama)[0] == "PASSIVE"
    assert _moemerge_settings(pico_llama, OMP_WAIT_POLICY="ACTIVE")[0] == "ACTIVE"
