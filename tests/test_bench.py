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
    # before the CUDA check: on a GPU each preset's row read "failed", and the exit status 0
    ("train_speed.py", ["--attention=bogus"], "--attention must be auto, sdpa or triton"),
    ("train_speed.py", ["--log_interval=0"], "--log_interval must be positive"),
    ("train_speed.py", ["--peak_tflops=-1"], "--peak_tflops must not be negative"),
    ("train_speed.py", ["--steps=0"], "--steps=0 leaves nothing to measure"),
    ("train_speed.py", ["--steps=10", "--profile"], "the first 10 steps (the log intervals up to the traced steps)"),
    # train.py traces steps 5 to 7: the intervals ending at steps 6 and 8 are slowed
    ("train_speed.py", ["--steps=8", "--profile", "--log_interval=2"], "--steps=8 leaves nothing to measure"),
    ("evaluate_speed.py", ["--parts=generate", "--batch_sizes=1,x"], "--batch_sizes takes positive whole numbers"),
    ("evaluate_speed.py", ["--parts=generate", "--batch_sizes=0"], "--batch_sizes takes positive whole numbers"),
    ("evaluate_speed.py", ["--parts=generate", "--new_tokens=0"], "--new_tokens must be positive"),
    ("evaluate_speed.py", ["--parts=generate", "--prompt_tokens=0"], "--prompt_tokens must be positive"),
    ("evaluate_speed.py", ["--parts=score", "--repeats=0"], "--repeats must be positive"),
    ("evaluate_speed.py", ["--parts=score", "--workers=-1"], "--workers must be >= 0"),  # was one per core
    ("forest_speed.py", ["--max_features=0"], "--max_features takes sqrt, log2, a positive count or a fraction"),
    ("forest_speed.py", ["--max_features=-3"], "--max_features takes sqrt, log2, a positive count or a fraction"),
    ("forest_speed.py", ["--max_features=2.0"], "--max_features takes sqrt, log2, a positive count or a fraction"),
    ("forest_speed.py", ["--rows=2"], "--rows must be 0 (no embeddings) or at least 100"),
])
def test_settings_that_cannot_work_are_one_line(script, args, message):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_synth_speeds_ideal_counts_the_concurrency_under_a_rate_limit():
    """10 records at concurrency 8 and 200 ms take two rounds, 0.4 s, however many the rate
    limit's first second lets through: the ideal said 40 records/s, not 25."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "synth_speed.py"), "--concurrency=8", "--rpm=600",
                             "--seconds=1"], capture_output=True, text=True, timeout=120)
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["8"]]
    assert result.returncode == 0 and [row[-1] for row in rows] == ["40.0", "25.0"], result.stdout + result.stderr


def test_forest_embeddings_are_named_by_their_row_count():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "forest_speed.py"), "--rows=500", "--dims=8",
                             "--n_trees=1", "--splits=1", "--jobs=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "\nembeddings 500 | 500 x 8 |" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
@pytest.mark.parametrize("args", [["bench/train_speed.py"], ["bench/evaluate_speed.py", "--parts=gpu"]])
def test_gpu_benchmarks_say_they_need_a_gpu(args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr, result.stderr
