"""Shared test setup: import the project from the repo root, and find tiktoken's
BPE files offline (../shared/tiktoken_cache) when TIKTOKEN_CACHE_DIR is unset."""

import os
import sys
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
