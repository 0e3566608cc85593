"""The benchmarks' command lines: a setting that cannot work is one line and exit 2, before
any work (the measurements themselves need a GPU or minutes, and are not tests)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, args, message", [
    ("forest_speed.py", ["--rows=-5"], "--rows must not be negative"),
    ("forest_speed.py", ["--dims=0"], "--dims must be positive"),
    ("forest_speed.py", ["--max_features=abc"], "--max_features takes sqrt, log2"),
    ("synth_speed.py", ["--concurrency=1,x"], "--concurrency takes positive whole numbers"),
    ("synth_speed.py", ["--seconds=-1"], "--latency_ms and --seconds must be positive"),
    ("train_speed.py", ["--presets=tiny"], "no reference figures for --presets=tiny"),
    ("evaluate_speed.py", ["--parts=cpu"], "unknown part 'cpu'"),
    ("train_speed.py", ["phi-1"], "unexpected argument 'phi-1'"),
])
def test_settings_that_cannot_work_are_one_line(script, args, message):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
@pytest.mark.parametrize("args", [["bench/train_speed.py"], ["bench/evaluate_speed.py", "--parts=gpu"]])
def test_gpu_benchmarks_say_they_need_a_gpu(args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr, result.stderr
