"""The benchmark suite's own measuring parts: the CPU clock and the per-package profile of a step."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"
spec = importlib.util.spec_from_file_location("benchmark_suite", SUITE)
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)


def python_loop(n: int) -> int:
    total = 0
    for i in range(n):  # no call per iteration, so the profiler adds little to it
        total += i * i
    return total


def test_profiled_steps_split_operators_from_python_and_skip_warmup():
    timer = suite.StepTimer({"clock": "cpu", "profile": True})
    a = torch.randn(256, 256)
    timer.start(measured=False)  # a warm-up step: timed, not profiled
    python_loop(2_000_000)
    timer.stop()
    for _ in range(2):
        timer.start(measured=True)
        for _ in range(20):
            a = torch.tanh(a @ a)
        python_loop(200_000)
        timer.stop()
    result = timer.result(warmup=1)
    assert result["median_step_s"] > 0 and len(timer.times) == 3
    packages = result["breakdown"]["packages_ms"]
    assert packages["torch C++ operators"] > 0
    # The loop is plain Python of this file: the warm-up's ten times longer loop is not in the profile.
    steps_python = packages["other Python"] * 2 / 1000
    warmup_cpu = timer.times[0]
    assert 0 < steps_python < warmup_cpu


def test_cpu_clock_ignores_sleep():
    wall, cpu = (suite.StepTimer({"clock": clock, "profile": False}) for clock in ("wall", "cpu"))
    for timer in (wall, cpu):
        timer.start(measured=True)
        time.sleep(0.2)
        timer.stop()
    assert wall.times[0] >= 0.2 and cpu.times[0] < 0.05


def test_owner_of_profiled_functions():
    assert suite.owner("/env/site-packages/pflat_lightning/module.py", "training_step") == "pflat_lightning"
    assert suite.owner("/env/site-packages/lightning/pytorch/loops/fit_loop.py", "run") == "lightning"
    assert suite.owner("/env/site-packages/opacus/accountants/analysis/rdp.py", "_log_add") == "opacus"
    assert suite.owner("~", "<built-in method torch._C._nn.linear>") == "torch C++ operators"
    assert suite.owner("~", "<built-in method builtins.isinstance>") == "Python builtins"
    assert suite.owner("/usr/lib/python3.11/threading.py", "wait") == "other Python"
