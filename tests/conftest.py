"""Shared test setup: import the project from the repo root, and find tiktoken's
BPE files offline (../shared/tiktoken_cache) when TIKTOKEN_CACHE_DIR is unset."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Without a GPU, Triton kernels (flash_attn_triton.py) run in Triton's CPU
# interpreter; it must be switched on before anything imports triton.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_CACHE = ROOT.parent / "shared" / "tiktoken_cache"
if _CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_CACHE))
if os.environ.get("TIKTOKEN_CACHE_DIR"):  # given relative (../shared/...): the scripts tests start elsewhere need it whole
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])

# A shell starts a background job (`pytest &`, nohup) with Ctrl-C ignored, and Python then
# installs no KeyboardInterrupt handler, neither here nor in the scripts the tests start
# (an ignored signal stays ignored across exec): the tests of what Ctrl-C does need it.
signal.signal(signal.SIGINT, signal.default_int_handler)


def at_work(args: list[str], workers: int = 2) -> tuple[subprocess.Popen, list[str]]:
    """A script (python ARGS, stderr piped) in a session of its own, as a shell's job, once
    its worker processes have started on the work: (the process, the workers' pids)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.time() + 60
    while proc.poll() is None and len(children.read_text().split()) < workers and time.time() < deadline:
        time.sleep(0.05)
    pids = children.read_text().split()
    time.sleep(0.3)  # past their start: what is tested is a stop while they work
    return proc, pids
