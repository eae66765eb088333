"""The package's environment defaults (transformer/__init__.py), set before torch loads its OpenMP runtime."""

import os
import subprocess
import sys

import pytest

PROBE = "import os, transformer; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("env,expected", [
    ({}, "10000 None"),  # a short spin before OpenMP's threads sleep
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE"),  # the user's wait policy wins: no spin count set over it
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),
    ({"GOMP_SPINCOUNT": "5"}, "5 None"),  # the user's spin count wins
])
def test_openmp_spin_default_leaves_the_users_choice(env, expected):
    assert _probe(**env) == expected
