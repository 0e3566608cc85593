"""Pretrain a phi-1 model on prepared token bins, on one process or many.

    python train.py                                  # CPU: the tiny preset on local Python files
    python train.py --preset=phi-1-small --compile   # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --preset=phi-1 --compile ...
    # several nodes: the same command on each (out_dir and data on a disk they share)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=phi1 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

The recipe is the paper's: AdamW, linear warmup then linear decay, gradient
accumulation up to the effective batch (phi-1: 1024 sequences of 2048 tokens).
What the paper leaves unsaid is ours: betas (0.9, 0.95), eps 1e-8, decay on weight
matrices only (the embedding and lm_head too), the gradient norm clipped at 1.0, the
decay ending at --min_lr=0; and bf16 where the paper trained in fp16 (--dtype=float16
for that). Batches are drawn at random offsets (the paper slices one
concatenated array) from one prepared dataset or a weighted mixture of several
(`--data=code:0.7,textbooks:0.3`). Which tokens a step reads depends only on
(seed, step), however processes and micro-steps split it, and the dropout
noise on (seed, step, micro-batch), so a run resumed from a checkpoint goes on
exactly as if it had never stopped; resumed on another number of processes,
too, but for the order of float sums (with dropout: with the same --batch_size).
Checkpoints are written atomically; SIGTERM, Ctrl-C or SIGHUP (the terminal or ssh
session closed; under nohup the run goes on instead, which under torchrun takes
--signals-to-handle=SIGTERM,SIGINT,SIGQUIT, see README.md) saves one and exits;
rerunning the same command resumes, whether the run started from scratch or
from weights (`--init_from=microsoft/phi-1`).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import inspect
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tokenizer
from config import (UserError, Unfailing, alike_on_every_process, file_stamp, first_process, parse_settings, report, require,
                    run, stop_signals)
from data.prepare import cannot_write, check_writable, ensure_prepared, read_meta, run_lock
from model import (GPT, PRESETS, GPTConfig, config_from_dict, load_checkpoint, load_for_tokens, pick_device,
                   pick_dtype)

DEFAULTS = dict(
    out_dir="out",  # checkpoints go to out_dir/ckpt.pt
    init_from="auto",  # auto (resume out_dir's checkpoint if any, else scratch), scratch, resume, or weights to start from (.pt, HF folder or hub id; a rerun resumes)
    data="local_python",  # a prepared dataset in data/ (or a folder), or several: "code,textbooks" (each by its size) or "code:0.7,textbooks:0.3"
    preset="tiny",  # model size: phi-1, phi-1-small, small, tiny, nano
    block_size=None,  # context length in tokens (None: the preset's)
    dropout=None,  # attention and residual dropout (None: the preset's)
    attention="auto",  # auto (Triton kernel on CUDA, else SDPA), sdpa (on GPUs cuDNN's kernels first), triton
    batch_size=8,  # sequences per micro-step and process
    total_batch_size=0,  # sequences per optimizer step over all processes (0: batch_size x processes)
    max_iters=200,  # optimizer steps in all: where the learning rate decays to min_lr
    stop_iters=0,  # stop after this step, the schedule still max_iters' (paper: phi-1-base is step 24000 of 36000; 0: max_iters)
    warmup_iters=20,  # linear warmup steps (paper: 750)
    learning_rate=1e-3,  # peak learning rate (paper: 1e-3)
    min_lr=0.0,  # the linear decay ends here at max_iters
    weight_decay=0.1,  # AdamW decay of weight matrices; biases and norms are not decayed
    beta1=0.9,  # AdamW betas
    beta2=0.95,  # the second moment's decay (the paper gives no betas: nanoGPT's and GPT-3's 0.95)
    grad_clip=1.0,  # clip the gradient norm (0: off)
    eval_interval=50,  # steps between validation losses, and one at the end (0: none)
    eval_iters=10,  # batches per validation loss (of batch_size: the same rows for the same product)
    log_interval=10,  # steps between log lines
    checkpoint_interval=50,  # steps between checkpoints, one at the end too (0: none but on SIGTERM)
    sample_tokens=100,  # tokens of code sampled at the end (0: none)
    device="auto",  # auto, cpu, cuda, cuda:1, ...
    dtype="auto",  # auto (bfloat16 on GPUs that have it), float32, bfloat16, float16
    compile=False,  # torch.compile the model
    peak_tflops=0.0,  # the chip's dense bf16 peak for MFU (0: known GPUs only)
    profile=False,  # trace 3 steps after the first log interval and print where the time went
    seed=1337,  # batches, dropout noise and (from scratch) initial weights; the train/val split is prepare.py's
)

# the settings besides the model's that decide what a run computes (a resume that changes one says so)
# (finetune.py's own too: what its data and best score are; max_iters is raised to go on, see build_model)
# (the batch per step is checked as the number of sequences, total_batch_size=0 meaning batch_size x processes)
# (--dtype as it resolved: auto is float32 on a CPU and bfloat16 or float16 on a GPU)
TRAJECTORY = ("data", "batch_size", "warmup_iters", "learning_rate", "min_lr", "weight_decay",
              "beta1", "beta2", "grad_clip", "dtype_used", "seed", "exercises_content", "loss_on",
              "val_fraction", "drop_failing", "humaneval_problems", "humaneval_max_tokens")
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_DATASET = "local_python"
DDP_TIMEOUT = datetime.timedelta(hours=1)  # how long a process waits in a collective for the others
SAMPLE_PROMPT = 'def is_prime(n):\n    """Return True if n is a prime number."""\n'
# dense bf16 peaks, the first name found in the device's wins (the PCIe and NVL cards are slower than SXM)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0,
               "H800 PCIe": 756.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}

_stop_signal: int | None = None  # set by a stop signal: save and exit (see train's loop)
_validating = False  # while process 0 validates (and scores): a signal stops that at once


# ---------------------------------------------------------------- processes

def setup_processes(name: str):
    """(rank, world size, device): torchrun's environment means DDP, NCCL on GPUs, gloo on CPUs."""
    with alike_on_every_process():  # (before the processes can talk)
        device = pick_device(name)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # process 0 alone validates, scores (finetune.py's HumanEval) and saves while the others
    # wait in the next all-reduce: NCCL's default limit, 10 minutes, would end a long score
    if not dist.is_initialized():  # (finetune.py starts them before its own checks)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=DDP_TIMEOUT)
    return rank, world, device


@contextlib.contextmanager
def together(world: int, device: torch.device):
    """Wraps work that every process reaches (holding no collective inside): if a UserError
    stops it on any process, every process stops at the end of the block, with status 2,
    the lowest rank that failed printing why. So a mistake gives one line, not one per
    process, nor the tracebacks of processes left waiting in a collective when a peer
    exits. With world > 1 the block's end is also a barrier."""
    error = None
    try:
        yield
    except UserError as e:
        if world == 1:
            raise
        error = e
    if world > 1:
        rank = dist.get_rank()
        first_failed = torch.tensor([rank if error else world], device=device)
        dist.all_reduce(first_failed, op=dist.ReduceOp.MIN)
        if int(first_failed) < world:
            if int(first_failed) == rank:
                report(error)
            dist.barrier()  # torchrun stops every process once one exits: not before the line is out
            raise SystemExit(2)


def out_of_memory(e: Exception) -> bool:
    """Whether e is running out of memory: torch.OutOfMemoryError (a RuntimeError) on a GPU,
    MemoryError or the allocator's RuntimeError on a CPU."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def stop_if_peer_gone(e: Exception) -> None:
    """Exit 2 with one line if e is a collective failing because another process exited (gloo's
    broken connection; NCCL's processes wait in theirs until torchrun stops them): that one said
    why (out of memory, say), not this one's traceback too."""
    if dist.is_initialized() and any(s in str(e) for s in ("Connection closed by peer", "Connection reset by peer")):
        print(f"process {dist.get_rank()}: stopping, as another process is gone (its message, or torchrun's "
              f"report if it was killed, says why)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def spread(value: int, world: int, device: torch.device) -> tuple[int, int]:
    """The lowest and highest value over the processes (a collective: call it outside `together`)."""
    if world == 1:
        return value, value
    extremes = torch.tensor([value, -value], device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MIN)
    return int(extremes[0]), -int(extremes[1])


def same_everywhere(value: str, world: int, device: torch.device) -> bool:
    """Whether every process holds the same value (a collective). Under DDP each node reads
    its own files, which must hold the same data."""
    digest = int.from_bytes(hashlib.sha256(value.encode()).digest()[:7], "big")
    low, high = spread(digest, world, device)
    return low == high


# ---------------------------------------------------------------- data

class Mixture:
    """Prepared datasets (flat uint16 token bins) sampled by weight.

    Row i of step s (the step's rows numbered over every micro-step of every
    process) picks a dataset by weight and a random window in it, drawn from
    (seed, s, i) alone: a step reads the same rows however the processes and
    micro-steps split it. Without weights, each dataset weighs its train
    tokens: the datasets read as one corpus, each seen as often as the others
    (the paper's CodeTextbook).
    """

    def __init__(self, spec: str, block_size: int, vocab_size: int, prepare_default: bool,
                 splits: tuple[str, ...] = ("train", "val")):
        self.block_size, self.vocab_size = block_size, vocab_size
        parts = [part.strip() for part in spec.split(",")]
        weighted = [":" in part and not Path(part).is_dir() for part in parts]  # (a folder's path may hold ":")
        if any(weighted) and not all(weighted):
            raise UserError(f"give every dataset a weight, or none (each then weighs its size): --data={spec}")
        self.names = [part.rpartition(":")[0].strip() if w else part for part, w in zip(parts, weighted)]
        if not all(self.names):
            raise UserError(f"a dataset without a name in --data={spec}")
        weights = None
        if all(weighted):
            try:
                weights = [float(part.rpartition(":")[2]) for part in parts]
            except ValueError:
                raise UserError(f"bad weight in --data={spec}") from None
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise UserError(f"dataset weights must be positive numbers: --data={spec}")
        self.folders = [self._folder(n, prepare_default, splits) for n in self.names]
        # opened once: the run reads the files it started with, should prepare.py replace or
        # remove them meanwhile (the same --name prepared again), not another corpus from then on
        self.files = {(i, split): open(folder / f"{split}.bin", "rb")
                      for i, folder in enumerate(self.folders) for split in splits}
        resolved = [folder.resolve() for folder in self.folders]
        twice = next((n for i, (n, r) in enumerate(zip(self.names, resolved)) if r in resolved[:i]), None)
        if twice:  # its weights would add up, and its validation loss be taken twice
            raise UserError(f"--data={spec} names the dataset {twice} twice")
        # what the folders hold now, for a resume to notice data prepared again under the same name
        self.content = ", ".join(map(self._content, self.folders))
        if weights is None:
            weights = [os.fstat(self.files[i, "train"].fileno()).st_size for i in range(len(self.folders))]
        weights = np.array(weights, dtype=np.float64) / max(weights)  # first: 1e308 twice sums to inf
        self.weights = weights / weights.sum()
        self.bounds = np.cumsum(self.weights)  # a row picks dataset i for a draw in [bounds[i-1], bounds[i])

    def __del__(self):
        for f in getattr(self, "files", {}).values():
            f.close()

    def _folder(self, name: str, prepare_default: bool, splits: tuple[str, ...]) -> Path:
        """The dataset's folder, checked to hold the splits that will be read."""
        folder = Path(name) if ("/" in name or Path(name).is_dir()) else DATA_DIR / name
        if name == DEFAULT_DATASET and prepare_default and not (folder / "meta.json").exists():
            print(f"preparing the default dataset (Python files on this machine) in {folder}")
            ensure_prepared(name)
        meta = read_meta(folder)
        output = None if meta is None else meta.get("output", "bins")
        if output == "jsonl":
            raise UserError(f"{folder} holds JSONL documents (prepare.py --output=jsonl), not token bins")
        if output is None:
            raise UserError(f"no prepared data at {folder} (run: python data/prepare.py ...)")
        if meta.get("dtype", "uint16") != "uint16":
            raise UserError(f"{folder} holds {meta['dtype']} tokens; train.py reads uint16, as prepare.py writes")
        if meta.get("vocab_size", tokenizer.VOCAB_SIZE) != tokenizer.VOCAB_SIZE:
            raise UserError(f"{folder} was prepared with another tokenizer ({meta['vocab_size']} ids, "
                            f"phi-1's has {tokenizer.VOCAB_SIZE}): prepare it with data/prepare.py")
        for split in splits:
            path = folder / f"{split}.bin"
            hint = " (to train without validation: --eval_interval=0)" if split == "val" else ""
            if not path.exists():
                raise UserError(f"no {split}.bin in {folder}{hint}")
            if path.stat().st_size < 4:
                raise UserError(f"{path} is empty: nothing to {'train' if split == 'train' else 'validate'} on{hint}")
            size, written = path.stat().st_size, (meta.get("files") or {}).get(path.name)
            if isinstance(written, int) and size != written:  # cut short by a full disk or a copy, or changed
                raise UserError(f"{path} holds {size:,} bytes, not the {written:,} prepare.py wrote: prepare the "
                                f"data again")
            if size % 2:  # uint16 tokens (checked for a meta.json of an older prepare.py, without sizes)
                raise UserError(f"{path} is cut short (an odd number of bytes): prepare the data again")
        return folder

    @staticmethod
    def _content(folder: Path) -> str:
        """What a prepared folder holds: its train tokens and prepare.py's fingerprint."""
        fingerprint = (read_meta(folder) or {}).get("fingerprint")
        return (f"{(folder / 'train.bin').stat().st_size // 2:,} train tokens in {folder.name}"
                + (f" (prepared {fingerprint[:12]})" if fingerprint else ""))

    def batch(self, split: str, seed: int, step: int, rows: range, only: int | None = None):
        """(inputs, targets) int64 arrays of shape (len(rows), block_size): the given rows
        of a step (of val batch number `step` for split "val"); with `only`, every row
        comes from that dataset."""
        picked = []
        windows = np.empty((len(rows), self.block_size + 1), dtype=np.int64)  # too many rows: MemoryError now
        for n, row in enumerate(rows):
            rng = row_rng(seed, split, step, row)
            i = int(np.searchsorted(self.bounds, rng.random() * self.bounds[-1], side="right"))
            i = i if only is None else only
            # a fresh memmap per row: a long-lived one grows the process's resident memory
            data = np.memmap(self.files[i, split], dtype=np.uint16, mode="r")
            if len(data) < self.block_size + 1:  # shorter than a window (toy data): it repeats
                data = np.resize(np.asarray(data), self.block_size + 1)
            start = int(rng.integers(0, len(data) - self.block_size))  # the last window ends on the last token
            picked.append(i)
            windows[n] = data[start:start + self.block_size + 1]
        if windows.max() >= self.vocab_size:
            bad = [self.folders[i] for i, w in zip(picked, windows) if w.max() >= self.vocab_size][0]
            raise UserError(f"{bad}/{split}.bin holds token id {windows.max()}, outside the model's "
                            f"vocabulary of {self.vocab_size}: prepared with another tokenizer?")
        return windows[:, :-1], windows[:, 1:]

    def counted(self, seed: int, step: int, rows: range) -> int:
        """How many targets of batch("train", seed, step, rows) the loss counts: all."""
        return len(rows) * self.block_size


def row_rng(seed: int, split: str, step: int, row: int) -> np.random.Generator:
    """The random draws of one row of a batch: a pure function of where it stands.
    (Keys of one length: numpy's seeding reads [a, b] and [a, b, 0] alike.)"""
    return np.random.default_rng([seed, split == "val", step, row])


def to_device(arrays, device: torch.device):
    tensors = [torch.from_numpy(a) for a in arrays]
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return tensors


# ---------------------------------------------------------------- optimisation

def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays weight matrices and embeddings, not biases or LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def learning_rate(step: int, cfg) -> float:
    """Linear warmup to the peak, then linear decay to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + (cfg.learning_rate - cfg.min_lr) * max(0.0, 1.0 - progress)


def peak_flops(cfg, device: torch.device) -> float | None:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for chip, tflops in PEAK_TFLOPS.items():
            if chip in name:
                return tflops * 1e12
    return None


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename tmp to path once tmp's bytes are on the disk, and sync the rename too. A file
    system may write a rename back before the data it names: after a power loss, path
    would be empty and the checkpoint before it gone."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system that cannot sync a folder: as safe as it gets
            os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, raw_model: GPT, step: int, cfg, **state) -> None:
    """Write to a temporary file, then rename: a kill or a power loss never leaves half a checkpoint.
    `state` adds what resuming needs (optimizer, scaler, best score)."""
    ckpt = {"model": raw_model.state_dict(), "config": asdict(raw_model.config), "step": step,
            "settings": vars(cfg), **state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(ckpt, tmp)
        replace_durably(tmp, path)
    except BaseException as e:  # Ctrl-C too
        tmp.unlink(missing_ok=True)  # the space a half-written file holds goes back
        # a full disk: torch's writer reports it as a RuntimeError; any other (a CUDA error) is a bug to show
        if not isinstance(e, OSError) and not (isinstance(e, RuntimeError) and
                                               re.search("inline_container|PytorchStreamWriter", str(e))):
            raise
        raise UserError(f"{cannot_write(path, e)}; the last checkpoint, if any, is intact") from None


def remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty
        folder.rmdir()


def inference_copy(model: GPT, dtype: torch.dtype) -> GPT:
    """A separate copy of model with its weights in dtype, for generation. Each tensor is
    cast as it is copied (deepcopy takes the copies given in its memo): deepcopy and then
    .to(dtype) would first hold a second float32 model, 5.6 GB for phi-1."""
    memo = {id(b): b.detach().to(dtype) for b in model.buffers() if b.is_floating_point()}
    memo.update({id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()})
    return copy.deepcopy(model, memo)


def _on_signal(signum, frame):
    global _stop_signal
    # a second signal stops at once if it is Ctrl-C, or SIGTERM after Ctrl-C (torchrun passes a
    # second Ctrl-C on as SIGTERM); a second SIGTERM, a scheduler's reminder, does not
    if _stop_signal is not None and (signum == signal.SIGINT or _stop_signal == signal.SIGINT):
        raise KeyboardInterrupt
    if _stop_signal is None:
        sys.stdout, sys.stderr = Unfailing(sys.stdout), Unfailing(sys.stderr)
    _stop_signal = _stop_signal or signum
    if first_process():  # under torchrun every process gets it
        print(f"{signal.Signals(signum).name}: saving a checkpoint, then stopping (Ctrl-C again: stop now)",
              file=sys.stderr, flush=True)
    if _validating:  # minutes of it (finetune.py's HumanEval score) would outlast a cluster's grace period
        raise KeyboardInterrupt


# ---------------------------------------------------------------- the run

def check_settings(cfg) -> None:
    """Stop at once, with one line, on settings that would crash later or train nothing."""
    positive = ["batch_size", "log_interval", "max_iters", "learning_rate"] + (
        ["eval_iters"] if cfg.eval_interval > 0 else [])
    not_negative = ["total_batch_size", "stop_iters", "warmup_iters", "eval_interval",
                    "checkpoint_interval", "sample_tokens", "seed", "min_lr", "weight_decay",
                    "grad_clip", "peak_tflops"]
    require((cfg.out_dir != "", "--out_dir must name a folder"),
            *[(getattr(cfg, key) > 0, f"--{key} must be positive, not {getattr(cfg, key)}") for key in positive],
            *[(getattr(cfg, key) >= 0, f"--{key} must not be negative, not {getattr(cfg, key)}") for key in not_negative],
            (cfg.seed < 2**63, f"--seed must be below 2**63, not {cfg.seed}"),
            (cfg.max_iters < 2**62, f"--max_iters must be below 2**62, not {cfg.max_iters}"),
            (cfg.learning_rate < 1e30 and cfg.min_lr < 1e30,  # (a float32 optimizer state holds up to 3.4e38)
             f"--learning_rate and --min_lr must be below 1e30, not {cfg.learning_rate} and {cfg.min_lr}"),
            (cfg.min_lr <= cfg.learning_rate, f"--min_lr ({cfg.min_lr}) must not be above --learning_rate "
                                              f"({cfg.learning_rate}): the decay would climb"),
            (cfg.stop_iters <= cfg.max_iters, f"--stop_iters ({cfg.stop_iters}) must not be above "
                                              f"--max_iters ({cfg.max_iters})"),
            (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1,
             f"--beta1 and --beta2 must be in [0, 1), not {cfg.beta1} and {cfg.beta2}"),
            (cfg.block_size is None or isinstance(cfg.block_size, int) and cfg.block_size > 0,
             f"--block_size must be a positive number of tokens, not {cfg.block_size!r}"),
            (cfg.dropout is None or isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1,
             f"--dropout must be a number in [0, 1), not {cfg.dropout!r}"),
            (cfg.attention in ("auto", "sdpa", "triton"),
             f"--attention must be auto, sdpa or triton, not {cfg.attention!r}"))
    check_writable(Path(cfg.out_dir) / "ckpt.pt")  # now, not after the model and data are made ready (minutes)


def model_overrides(cfg) -> dict:
    """The settings that change a preset's (or loaded weights') model."""
    overrides = {"attention": cfg.attention}
    if cfg.block_size is not None:
        overrides["block_size"] = cfg.block_size
    if cfg.dropout is not None:
        overrides["dropout"] = float(cfg.dropout)
    return overrides


def requested_config(cfg) -> GPTConfig:
    """The model the settings ask for: a preset with its overrides."""
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[cfg.preset], **model_overrides(cfg))


def build_model(cfg, out_dir: Path, master: bool):
    """(model, checkpoint when resuming, where the run started: "scratch" or the weights).

    Rerunning a command resumes the checkpoint in out_dir, whether the run started from
    scratch (--init_from=auto) or from weights (the same --init_from). Without a preset
    (finetuning) the model is whatever the checkpoint or weights hold."""
    ckpt_path = out_dir / "ckpt.pt"
    mode = cfg.init_from
    if mode == "auto" or (mode not in ("scratch", "resume") and ckpt_path.exists()):
        mode = "resume" if ckpt_path.exists() else "scratch"
    if mode == "resume":
        try:
            ckpt = load_checkpoint(ckpt_path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"cannot resume: {e}") from None
        ran = "finetune.py" if "exercises" in ckpt.get("settings", {}) else "train.py"  # its own setting
        runs = "finetune.py" if hasattr(cfg, "exercises") else "train.py"
        if ran != runs:  # pretraining steps would replace a finetuned model, or the reverse
            raise UserError(f"{ckpt_path} holds a {ran} run: resume it with {ran}, or use another --out_dir")
        origin = ckpt.get("origin") or recorded_origin(ckpt)
        # (a path moved or removed since matches as it was: resuming does not read it)
        if cfg.init_from not in ("auto", "resume") and origin not in ("resume", origin_of(cfg.init_from),
                                                                      str(Path(cfg.init_from).resolve())):
            raise UserError(f"{ckpt_path} holds a run that started from {origin}, not from {cfg.init_from}; "
                            f"use another --out_dir")
        saved = replace(config_from_dict(ckpt["config"]), attention=cfg.attention)
        wanted = (requested_config(cfg) if origin == "scratch" and cfg.preset
                  else replace(saved, **model_overrides(cfg)))
        if cfg.dropout is None:  # unsaid, the run's own (rerunning its command resumes it)
            wanted = replace(wanted, dropout=saved.dropout)
        # dropout is how the weights train, not what they are: a resume may change it
        if replace(saved, dropout=wanted.dropout) != wanted:
            differs = ", ".join(f"{k} {v} (asked: {getattr(wanted, k)})" for k, v in asdict(saved).items()
                                if v != getattr(wanted, k) and k != "dropout")
            raise UserError(f"{ckpt_path} holds another model than this run asks for: {differs}; use another "
                            f"--out_dir")
        if not {"step", "optimizer", "scaler"} <= ckpt.keys():
            raise UserError(f"{ckpt_path} holds weights without the state to resume their training (a best.pt "
                            f"copied there?): start from them with --init_from={ckpt_path} and another --out_dir")
        try:
            model = GPT.from_state_dict(wanted, ckpt["model"])
        except ValueError as e:
            raise UserError(f"cannot resume: {ckpt_path}'s weights do not fit the model its config describes "
                            f"({e})") from None
        if master:
            print(f"resuming {ckpt_path} from step {ckpt['step']}")
            # a step's rows do not depend on --batch_size, which only splits them; dropout noise does
            had = ckpt.get("settings", {})
            trajectory = [k for k in TRAJECTORY if k != "batch_size" or saved.dropout]
            changed = [k for k in trajectory if k in had and
                       same_form(k, had[k]) != same_form(k, getattr(cfg, k, had[k]))]
            changes = [(f"{k.replace('_', ' ')}: " if k.endswith(("_content", "_used")) else f"--{k}=")
                       + f"{getattr(cfg, k)} (was {had[k]})" for k in changed]  # (*_content, *_used: not settings)
            if wanted.dropout != saved.dropout:
                changes.append(f"--dropout={wanted.dropout:g} (was {saved.dropout:g})")
            if changes:
                print("warning: resuming with other settings than the run had: " + ", ".join(changes),
                      file=sys.stderr)
            rows, had_rows = cfg.eval_iters * cfg.batch_size, had.get("eval_iters", 0) * had.get("batch_size", 0)
            if cfg.eval_interval > 0 and had.get("eval_interval", 0) > 0 and rows != had_rows:
                keep = (f": give --eval_iters={had_rows // cfg.batch_size} to keep them"
                        if had_rows % cfg.batch_size == 0 else "")
                print(f"note: the validation loss is measured on {rows} rows (--eval_iters x --batch_size), "
                      f"the run's was on {had_rows}, so its curve may step{keep}", file=sys.stderr)
            # raising max_iters is how a finished run goes on, but its linear decay then starts higher up
            before = SimpleNamespace(**{**vars(cfg), "max_iters": had.get("max_iters")})
            if before.max_iters not in (None, cfg.max_iters):
                was, now = learning_rate(ckpt["step"], before), learning_rate(ckpt["step"], cfg)
                if not math.isclose(was, now, rel_tol=0.01, abs_tol=1e-12):
                    print(f"warning: with --max_iters={cfg.max_iters} (was {before.max_iters}) the learning rate "
                          f"goes from {was:.2e} to {now:.2e} at step {ckpt['step']}", file=sys.stderr)
        return model, ckpt, origin
    if mode == "scratch":
        if not cfg.preset:
            raise UserError("training from scratch needs a --preset")
        if ckpt_path.exists() and master:
            print(f"warning: --init_from=scratch: training anew; the first checkpoint replaces the run in "
                  f"{ckpt_path}", file=sys.stderr)
        torch.manual_seed(cfg.seed)
        return GPT(requested_config(cfg)), None, "scratch"
    model = load_for_tokens(mode)  # weights to start from: our checkpoint, a Hugging Face folder or hub id
    overrides = model_overrides(cfg)
    model.set_context(overrides.pop("block_size", model.config.block_size))
    for key, value in overrides.items():  # the blocks share this config
        setattr(model.config, key, value)
    if master:
        ignored = (f" (the weights' own model: --preset={cfg.preset} does not apply)"
                   if cfg.preset and cfg.preset != DEFAULTS["preset"] else "")
        print(f"starting from {mode}{ignored}")
        if cfg.dropout is None and model.config.dropout == 0 and not Path(mode).is_file():  # (HF's configs: 0.0)
            print(f"note: {mode} has no dropout, and trains without; phi-1 trained and was finetuned with 0.1: "
                  f"pass --dropout=0.1 for that", file=sys.stderr)
    return model.float(), None, origin_of(mode)


def same_form(key: str, value):
    """A setting as a resume compares it: --data's folders with or without a trailing slash."""
    return re.sub(r"/+(?=:|,|$)", "", value) if key == "data" and isinstance(value, str) else value


def origin_of(init_from: str) -> str:
    """What a run started from, as checkpoints record it: a local path resolved (however it
    was spelled), a hub id as given."""
    return str(Path(init_from).resolve()) if Path(init_from).exists() else init_from


def recorded_origin(ckpt: dict) -> str:
    """The origin of a checkpoint written before checkpoints recorded one: its --init_from
    ("resume" when that run was itself resumed: unknown, not checked)."""
    init_from = ckpt.get("settings", {}).get("init_from", "scratch")
    return "scratch" if init_from in ("auto", "scratch") else origin_of(init_from)


def train(cfg, make_data=None, score=None) -> GPT:
    """Run the training that cfg describes; returns the trained (unwrapped) model.

    make_data: a function of the model's config returning the batches to train on,
    anything with Mixture's `names`, `batch()` and `counted()` (default: the Mixture
    that --data names; finetune.py passes its exercises). score: a function of the
    model returning (name, value), higher is better, called with each validation
    loss; the best model so far is kept in out_dir/best.pt (finetune.py passes
    HumanEval's pass@1).

    SIGTERM, Ctrl-C and SIGHUP (stop_signals) save and stop while it runs; afterwards
    they do again what they did before (a caller that goes on, and the processes it
    forks, keep theirs)."""
    global _stop_signal
    handlers = {s: signal.getsignal(s) for s in stop_signals()}
    streams = sys.stdout, sys.stderr  # a stop signal makes them Unfailing
    _stop_signal = None
    try:
        with contextlib.ExitStack() as held:  # out_dir's lock, which _train takes, goes however it ends
            return _train(cfg, make_data, score, held)
    except (RuntimeError, MemoryError) as e:
        stop_if_peer_gone(e)
        if not out_of_memory(e):
            raise
        context = " or --block_size" if make_data is None else ""  # finetune.py's data: the base model's context
        raise UserError(f"out of memory: lower --batch_size (--total_batch_size keeps the batch per step, by "
                        f"gradient accumulation){context} ({str(e).strip().splitlines()[0][:300]})") from None
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        sys.stdout, sys.stderr = streams


def _train(cfg, make_data, score, held: contextlib.ExitStack) -> GPT:
    rank, world, device = setup_processes(cfg.device)
    master = rank == 0
    with together(world, device):
        check_settings(cfg)
        if cfg.total_batch_size % (cfg.batch_size * world):
            raise UserError(f"--total_batch_size={cfg.total_batch_size} is not a multiple of batch_size x processes "
                            f"= {cfg.batch_size * world}")
        ptdtype = pick_dtype(cfg.dtype, device)
    cfg.dtype_used = str(ptdtype).removeprefix("torch.")  # recorded in the checkpoints' settings
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"

    ckpt_seen = file_stamp(ckpt_path)  # looked at again once out_dir is this run's (run_lock below)
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    for turn in (True, False):  # a node's first process fetches hub weights once, then the rest
        with together(world, device):
            if first_on_node == turn:
                raw_model, ckpt, origin = build_model(cfg, out_dir, master)
    start_step = ckpt["step"] if ckpt else 0
    saved_step = start_step if ckpt else None  # the step ckpt.pt holds (save() moves it)
    # several nodes: every one must see the same checkpoint (out_dir on a shared disk)
    first, last = spread(start_step, world, device)
    with together(world, device):
        if first != last:
            raise UserError(f"processes resume from different steps ({first} to {last}): "
                            f"--out_dir must be one folder that every node shares")
    end = cfg.stop_iters or cfg.max_iters  # the last step of this run
    # a run stopped while it scored its last model: score it now (a run that goes on from a
    # --stop_iters off the --eval_interval would never score that step)
    score_due = bool(ckpt and ckpt.get("score_due")) and score is not None and cfg.eval_interval > 0
    if ckpt and start_step >= end and not score_due:
        if master:
            print(f"{ckpt_path} already finished {start_step} steps; raise --max_iters (or --stop_iters) to go "
                  f"on, or use another --out_dir to train anew")
        return raw_model
    if score_due and master:
        print(f"{ckpt_path} holds step {start_step}, but its run stopped before it scored that step: scoring it now")
    # a run that ended on a validation step validated and scored it: going on, it is not done again
    evaluated = bool(ckpt and ckpt.get("scored")) and score is not None
    config = raw_model.config
    total = cfg.total_batch_size or cfg.batch_size * world
    accum = total // (cfg.batch_size * world)
    with together(world, device):
        if cfg.profile and start_step < end and end - start_step < cfg.log_interval + 5:
            raise UserError(f"--profile traces steps {cfg.log_interval + 3} to {cfg.log_interval + 5} of this "
                            f"run: it needs {cfg.log_interval + 5} steps to go, not {end - start_step}")

    splits = ("train", "val") if cfg.eval_interval > 0 else ("train",)
    with together(world, device):  # the default dataset is prepared once, by the first process
        if make_data is None and master:
            Mixture(cfg.data, config.block_size, config.vocab_size, prepare_default=True, splits=splits)
    with together(world, device):
        data = (make_data(config) if make_data is not None else
                Mixture(cfg.data, config.block_size, config.vocab_size, prepare_default=False, splits=splits))
    if make_data is None:
        cfg.data_content = data.content  # recorded in the checkpoints' settings
        same_data = same_everywhere(data.content, world, device)
        with together(world, device):
            if not same_data:
                raise UserError(f"processes read different data (process {rank}: {data.content}): --data "
                                f"must hold the same prepared files on every node")
    with together(world, device):
        if master:
            if not out_dir.exists():  # made here: removed again if the run ends with nothing in it (bad data)
                out_dir.mkdir(parents=True)
                held.callback(remove_if_empty, out_dir)
            # a second run would overwrite the first's checkpoints
            held.enter_context(run_lock(out_dir, f"another run is training in {out_dir}: wait for it, stop it, "
                                                 f"or use another --out_dir"))
            if file_stamp(ckpt_path) != ckpt_seen:  # this run would go on from an older step, and overwrite it
                raise UserError(f"{ckpt_path} was saved by another run while this one started (one stopping as "
                                f"this one read it): rerun to go on from it")
            for done in (ckpt_path, out_dir / "best.pt"):  # a run killed while saving leaves its temporary file
                done.with_name(done.name + ".tmp").unlink(missing_ok=True)
    raw_model.to(device)
    optimizer = make_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    # the best score so far, kept in out_dir/best.pt, and what gave it (finetune.py: which problems)
    best, best_by = (ckpt.get("best"), ckpt.get("best_by")) if ckpt else (None, None)
    if ckpt:
        # the moments from the checkpoint; the settings (weight decay, betas, fused) this run's
        # own: load_state_dict would bring back the old ones, which a resume's warning says changed
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        if ckpt["scaler"] and scaler.is_enabled():  # else a run in bf16 or float32 before: a fresh scale
            scaler.load_state_dict(ckpt["scaler"])
        had = ckpt.get("settings", {})
        if (make_data is None and master and same_form("data", had.get("data")) == same_form("data", cfg.data)
                and had.get("data_content", data.content) != data.content):  # another --data warned already
            print(f"warning: --data={cfg.data} holds other data than the run had (prepared again?): "
                  f"{data.content} (was {had['data_content']})", file=sys.stderr)
        was = ckpt.get("total_batch", total)
        if was != total and master:  # 0 means batch_size x processes, which changed
            print(f"warning: this run's steps are {total} sequences, the checkpoint's were {was}: give "
                  f"--total_batch_size={was} to keep them" + (" (and a --batch_size that, times the processes, "
                                                              "divides it)" if was % (cfg.batch_size * world) else ""),
                  file=sys.stderr)
        del ckpt
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        # the only buffer, the rotary table, is a constant: no broadcast every forward
        # (torch 2.13 renamed broadcast_buffers, which now warns, to forward_sync_buffers)
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers")
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
    autocast = (torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 else contextlib.nullcontext())

    tokens_per_step = total * config.block_size
    peak = peak_flops(cfg, device)
    if master:
        print(f"model: {raw_model.num_params() / 1e6:.1f}M parameters, {config.n_layer} layers, "
              f"width {config.n_embd}, context {config.block_size}; {world} process(es) on {device}, {ptdtype}")
        print(f"batch: {total} sequences x {config.block_size} tokens = {tokens_per_step:,} tokens per step "
              f"({accum} micro-step(s) of {cfg.batch_size} per process); data: {', '.join(data.names)}")
        if cfg.checkpoint_interval == 0:
            print("warning: --checkpoint_interval=0: this run saves no checkpoint (but on SIGTERM or Ctrl-C); "
                  "its weights are gone when it ends", file=sys.stderr)
        if cfg.warmup_iters >= cfg.max_iters:
            print(f"warning: --warmup_iters={cfg.warmup_iters} is as long as the run or longer (--max_iters="
                  f"{cfg.max_iters}): the learning rate climbs to {learning_rate(cfg.max_iters - 1, cfg):.2e} "
                  f"and never decays (to --min_lr={cfg.min_lr:g})", file=sys.stderr)

    @torch.no_grad()
    def val_losses() -> dict[str, float]:
        model.eval()
        losses = {}
        for i, name in enumerate(data.names):
            total_loss, counted = 0.0, 0  # a mean over the targets that count (finetuning masks prompts)
            for k in range(cfg.eval_iters):  # rows numbered on: --eval_iters x --batch_size rows, however split
                rows = range(k * cfg.batch_size, (k + 1) * cfg.batch_size)
                x, y = to_device(data.batch("val", cfg.seed, 0, rows, only=i), device)
                n = int((y != -1).sum())
                with autocast:
                    total_loss += model(x, y)[1].item() * n
                counted += n
            losses[name] = total_loss / counted if counted else float("nan")
            if not counted:
                print(f"warning: no val loss for {name}: its {cfg.eval_iters} batches count no target (finetuning: "
                      f"every window fell inside a prompt); raise --eval_iters", file=sys.stderr)
        model.train()
        return losses

    def print_val_loss(step: int) -> None:
        nonlocal best, best_by
        losses = val_losses()
        print(f"step {step}: val loss " + ", ".join(f"{v:.4f} ({k})" for k, v in losses.items()), flush=True)
        if score is not None:
            # scored as evaluate.py scores a checkpoint: weights in the training dtype (a bf16
            # copy on a GPU), no autocast, so generate() replays its decoding steps as CUDA graphs
            scored = raw_model if ptdtype == torch.float32 else inference_copy(raw_model, ptdtype)
            name, value = score(scored.eval())
            del scored
            raw_model.train()
            if best is not None and name != best_by:  # a score of other problems does not compare
                print(f"note: {out_dir / 'best.pt'} scored {best:.4f} by {best_by or 'another score'}; the next "
                      f"score, by {name}, replaces it", file=sys.stderr)
                best = None
            improved = best is None or value >= best  # a tie goes to the later model, trained on more
            print(f"step {step}: {name} {value:.4f}" + (" (best so far: saved best.pt)" if improved else ""),
                  flush=True)
            if improved:
                best, best_by = value, name
                save_checkpoint(out_dir / "best.pt", raw_model, step, cfg, best=best, best_by=best_by, origin=origin)

    for s in stop_signals():
        signal.signal(s, _on_signal)
    first_bad = torch.tensor(cfg.max_iters + 1, device=device)  # first step with a non-finite loss
    # Under DDP a signal may reach one process, or each at another step, a loss turn inf on
    # one, or a mistake (said_together) stop one, and all must stop at the same step. Every
    # step the processes reduce their flags (first bad step, signal, first failed process)
    # on the device, and each reads the reduction of the step before from pinned memory
    # behind an event: all read the same value at the same step, and the wait is for work
    # the GPU has finished (the host runs a step ahead), so it stalls nothing. (Log and
    # checkpoint steps wait for the step's own reduction.)
    lagged = [torch.zeros(3, dtype=torch.int64, pin_memory=device.type == "cuda") for _ in range(2)]
    events = [torch.cuda.Event() for _ in range(2)] if device.type == "cuda" else None

    failure = None  # under DDP, a UserError of this process: said once every process stops (see flags)

    @contextlib.contextmanager
    def said_together():
        """A UserError here stops one process at once; under DDP it is kept, and every
        process stops at the step where the flags say so, the first that failed saying why
        (a process that exits alone leaves the others in a collective, to fail noisily)."""
        nonlocal failure
        try:
            yield
        except UserError as e:
            if world == 1:
                raise
            failure = failure or e

    def stop_if_failed() -> None:
        """Every process stops here, with status 2, if one has a failure kept by said_together."""
        with together(world, device):
            if failure:
                raise failure

    def micro_batch(j: int) -> range:
        """The rows of a step that its j-th micro-batch holds. Process r's micro-step m reads
        micro-batch m * world + r: on any number of processes a step reads rows 0 to total - 1."""
        return range(j * cfg.batch_size, (j + 1) * cfg.batch_size)

    def validate(step: int) -> bool:
        """print_val_loss(step), or False where a signal came before or during it."""
        global _validating
        _validating = True
        try:
            if _stop_signal is None:
                print_val_loss(step)
                return True
        except KeyboardInterrupt:  # raised by _on_signal
            pass
        finally:
            _validating = False
        model.train()
        return False

    def stop_run(signum: int):
        if world > 1:  # torchrun stops every process once one exits: not before the save
            dist.barrier()
        if master:
            print(f"stopped by {signal.Signals(signum).name}; rerun the same command to resume")
        sys.exit(128 + signum)

    def save(step: int, score_due: bool = False, scored: bool = False) -> None:
        """The run's checkpoint (process 0's); score_due: the last step's, saved before its score;
        scored: saved again after it."""
        nonlocal saved_step
        # an update by a gradient of inf (its loss finite) leaves nan weights, seen in the loss a step later
        if not torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all():
            raise UserError(f"the weights became inf or nan in step {step}: training diverged; {ckpt_path} keeps "
                            f"the checkpoint before (lower --learning_rate, or resume from it)")
        saved_step = step
        save_checkpoint(ckpt_path, raw_model, step, cfg, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        best=best, best_by=best_by, score_due=score_due, scored=scored, origin=origin,
                        total_batch=total)

    with together(world, device):  # the first batch's data checked: a mistake is one line
        x, y = to_device(data.batch("train", cfg.seed, start_step, micro_batch(rank)), device)
    t_last, step_last = time.time(), start_step
    model.train()
    step = start_step
    saved_unscored = False  # ckpt.pt holds the step whose validation a stop interrupted
    profiler = None
    if cfg.profile and master:
        # one cycle (repeat=0 would trace again every log_interval + 5 steps to the end)
        schedule = torch.profiler.schedule(wait=cfg.log_interval, warmup=2, active=3, repeat=1)
        profiler = torch.profiler.profile(schedule=schedule)
        profiler.start()
    while step < end:
        if cfg.eval_interval > 0 and master and failure is None and (  # (failed: stopping, nothing to keep)
                step % cfg.eval_interval == 0 and not (evaluated and step == start_step)
                or score_due and step == start_step):
            t_eval = time.time()
            validated = False
            with said_together():  # (bad val data, a full disk: process 0's alone under DDP)
                validated = validate(step)
            if not validated and failure is None:  # a signal stopped it: saved at this step, for a resume to score
                # (DDP: a failure, kept by said_together, stops every process at the next flags, nothing saved)
                if saved_step != step:
                    with said_together():
                        save(step, score_due=score is not None)
                        print(f"saved {ckpt_path} at step {step}", flush=True)
                if world == 1:
                    stop_run(_stop_signal)
                saved_unscored = True  # DDP: every process stops at the next step's flags; no save replaces it
            t_last += time.time() - t_eval  # the throughput counts training time only
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Each micro-step's loss is a mean over the targets it counts (finetuning masks
        # prompts). Weighted by that count over the step's average, every counted target of
        # the step, on any process, weighs the same. The counts are a pure function of the
        # rows: every process knows them all, without talking. In pretraining every weight
        # is exactly 1.
        counts = [data.counted(cfg.seed, step, micro_batch(j)) for j in range(world * accum)]
        step_count = sum(counts)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            if world > 1:  # gradients are averaged over processes on the last micro-step only
                model.require_backward_grad_sync = micro == accum - 1
            j = micro * world + rank
            torch.manual_seed(hash((cfg.seed, step, j)) % 2**63)  # dropout noise, reproducible on resume
            weight = counts[j] * world * accum / step_count if step_count else 0.0
            with autocast:
                _, loss = model(x, y)
                loss = loss * weight / accum
            nxt = (step, j + world) if micro + 1 < accum else (step + 1, rank)
            with said_together():  # (failed, the last batch trains again until every process stops, unsaved)
                x, y = to_device(data.batch("train", cfg.seed, nxt[0], micro_batch(nxt[1])), device)
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        # remembered on the device, read at the next log line: no host sync in the step
        first_bad = torch.where(torch.isfinite(step_loss) | (first_bad <= step), first_bad,
                                first_bad.new_full((), step))
        if step_count:  # a step of prompts only (finetuning) has nothing to learn: no update, no decay
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if profiler:
            profiler.step()

        last = step == end
        checkpoint = cfg.checkpoint_interval > 0 and (last or step % cfg.checkpoint_interval == 0)
        agreed = False  # under DDP: did the step before end with a signal, a bad loss or a failure somewhere?
        if world > 1:
            flags = torch.stack([first_bad, first_bad.new_full((), -(_stop_signal or 0)),
                                 first_bad.new_full((), rank if failure else world)])
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            lagged[step % 2].copy_(flags, non_blocking=True)
            if events:
                events[step % 2].record()
            if step >= start_step + 2:
                if events:
                    events[(step - 1) % 2].synchronize()
                bad, stop, failed = lagged[(step - 1) % 2].tolist()
                agreed = bad <= cfg.max_iters or stop != 0 or failed < world
        # one process stops right after a signal, processes under DDP one step later
        if step % cfg.log_interval == 0 or last or checkpoint or (world == 1 and _stop_signal) or agreed:
            if world > 1:  # this step's reduction, on its way already: every process stops together
                if events:
                    events[step % 2].synchronize()
                bad, stop, failed = lagged[step % 2].tolist()
                stop = -stop  # reduced as minus the signal: MIN finds any
            else:
                bad, stop, failed = int(first_bad), _stop_signal or 0, world
            if failed < world:
                stop_if_failed()
            if bad <= cfg.max_iters:
                with together(world, device):  # every process knows: one says it
                    kept = (f": a rerun goes on from {ckpt_path}, step {saved_step}" if saved_step is not None
                            else "; no checkpoint was saved")
                    raise UserError(f"the loss became inf or nan at step {bad + 1}: training diverged "
                                    f"(lower --learning_rate{kept})")
            if world > 1 and (step % cfg.log_interval == 0 or last):
                # the step's loss over every process (each holds its share of the mean times world)
                dist.all_reduce(step_loss)
                step_loss /= world
            if master and (step % cfg.log_interval == 0 or last):  # a run shorter than log_interval logs too
                dt = time.time() - t_last
                tok_s = tokens_per_step * (step - step_last) / dt
                mfu = (f" | MFU {100 * raw_model.flops_per_token() * tok_s / world / peak:.1f}%" if peak else "")
                mem = (f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                       if device.type == "cuda" else "")
                shown = f"{step_loss.item():.4f}" if step_count else "- (no target counted)"
                print(f"step {step} | loss {shown} | lr {lr:.2e} | "
                      f"{1000 * dt / (step - step_last):.0f} ms/step | {tok_s:,.0f} tok/s{mfu}{mem}", flush=True)
                t_last, step_last = time.time(), step
            if stop or checkpoint:
                if master and not saved_unscored:
                    t_save = time.time()
                    with said_together():  # (a stop says it below, a checkpoint at the next step's flags)
                        save(step, score_due=last and score is not None and cfg.eval_interval > 0)
                        print(f"saved {ckpt_path} at step {step}", flush=True)
                    t_last += time.time() - t_save  # as for evaluation: tokens/s counts training time only
                if stop:
                    stop_if_failed()
                    stop_run(stop)

    stop_if_failed()  # in the last step's save (or its batch for the step after)
    # training is over: a signal from now on stops the final evaluation and sample at once
    for s in stop_signals():
        signal.signal(s, signal.default_int_handler)
    if _stop_signal:  # came after the last step's check
        raise KeyboardInterrupt
    if profiler:
        profiler.stop()
        time_column = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=time_column, row_limit=30, max_name_column_width=100))
    if master:
        if cfg.eval_interval > 0:
            print_val_loss(step)
            if score is not None and saved_step == step:  # the checkpoint of this step: its score is taken
                save(step, scored=True)
                print(f"saved {ckpt_path} at step {step} with its score", flush=True)
        prompt = tokenizer.encode(SAMPLE_PROMPT) if cfg.sample_tokens > 0 else []
        # a small context holds fewer (generate() never feeds the last new token back)
        n_sample = min(cfg.sample_tokens, config.block_size - len(prompt) + 1)
        if cfg.sample_tokens > 0 and n_sample <= 0:
            print(f"note: no sample: the context of {config.block_size} tokens cannot hold its "
                  f"{len(prompt)}-token prompt", file=sys.stderr)
        if n_sample > 0:
            raw_model.eval()
            try:
                with autocast:
                    new = raw_model.generate([prompt], n_sample, temperature=0.8, top_p=0.95, seed=cfg.seed)[0]
                print("sample:\n" + SAMPLE_PROMPT + tokenizer.decode(new))
            except FloatingPointError as e:  # float16 overflowing in the sample alone: the run is done and saved
                print(f"note: no sample: {e}", file=sys.stderr)
    return raw_model


def main():
    cfg = parse_settings(DEFAULTS, __doc__)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # before training takes them over: a SIGTERM while the default dataset is prepared stops its
    # workers too, as Ctrl-C does (prepare.py's own rule), not a kill that orphans them
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run(main)
