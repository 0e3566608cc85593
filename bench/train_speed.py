"""Training throughput of the phi-1 presets on one GPU, beside DESIGN.md's reference.

Runs train.py itself (the real loop: data loading, bf16 autocast, fused AdamW,
gradient clipping, torch.compile) on random tokens at context 2048 and reads
tokens/s, MFU and peak memory from its log. The reference figures are those of
a nanoGPT-style GPT with torch.compile and SDPA on one H200.

    python bench/train_speed.py                         # both presets, SDPA attention
    python bench/train_speed.py --attention=auto        # our Triton kernel instead
    python bench/train_speed.py --profile --steps=25    # and where the GPU time goes
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config import UserError, parse_settings, require, run  # noqa: E402

DEFAULTS = dict(
    presets="phi-1-small,phi-1",  # presets to measure
    attention="sdpa",  # as train.py: sdpa (as the reference), triton (our kernel) or auto (triton on CUDA)
    steps=20,  # optimizer steps per preset; the first log interval holds the compilation
    log_interval=5,  # steps per measurement
    compile=True,  # torch.compile, as the reference
    dropout=0.0,  # the presets' 0.1 is the paper's training; the reference ran without
    profile=False,  # also print train.py's profile of 3 steps (those steps are left out of the figures)
    peak_tflops=0.0,  # the GPU's dense bf16 TFLOP/s, for MFU (0: train.py's table of known GPUs)
)

# preset -> (micro-batch, reference tokens/s, reference MFU %) on one H200
REFERENCE = {"phi-1-small": (16, 216_000, 51.0), "phi-1": (8, 61_000, 56.0)}
LOG = re.compile(r"step (\d+) \|.*\| ([\d,]+) tok/s \| MFU ([\d.]+)% \| ([\d.]+) GiB")


def main():
    cfg = parse_settings(DEFAULTS, __doc__)
    unknown = [p for p in cfg.presets.split(",") if p not in REFERENCE]
    if unknown:
        raise UserError(f"no reference figures for --presets={unknown[0]}; choose from {', '.join(REFERENCE)}")
    # the first interval holds the compilation; with profile, those up to the last traced step
    # (train.py traces steps log_interval + 3 to log_interval + 5) are slowed too
    first = cfg.log_interval * (-(-(cfg.log_interval + 5) // cfg.log_interval) if cfg.profile else 1)
    require((cfg.attention in ("auto", "sdpa", "triton"),
             f"--attention must be auto, sdpa or triton (as train.py takes), not {cfg.attention!r}"),
            (cfg.log_interval > 0, f"--log_interval must be positive, not {cfg.log_interval}"),
            (cfg.peak_tflops >= 0, f"--peak_tflops must not be negative, not {cfg.peak_tflops}"),
            (cfg.steps > first, f"--steps={cfg.steps} leaves nothing to measure: the first {first} steps "
                                f"({'the log intervals up to the traced steps' if cfg.profile else '--log_interval'}) "
                                f"are left out"))
    import torch
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    from train import PEAK_TFLOPS
    if not cfg.peak_tflops and not any(chip in device for chip in PEAK_TFLOPS):  # train.py would log no MFU
        raise UserError(f"train.py knows no bf16 peak for the {device}: give --peak_tflops (its dense bf16 TFLOP/s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "random"
        data.mkdir()
        rng = np.random.default_rng(0)
        for split, n in (("train", 10_000_000), ("val", 1_000_000)):
            rng.integers(0, 50_000, size=n, dtype=np.uint16).tofile(data / f"{split}.bin")
        (data / "meta.json").write_text("{}")
        for preset in cfg.presets.split(","):
            batch, ref_tok_s, ref_mfu = REFERENCE[preset]
            cmd = [sys.executable, str(ROOT / "train.py"), f"--preset={preset}", f"--data={data}",
                   f"--batch_size={batch}", f"--max_iters={cfg.steps}", f"--log_interval={cfg.log_interval}",
                   "--warmup_iters=5", "--eval_interval=0", "--checkpoint_interval=0",
                   "--sample_tokens=0", f"--attention={cfg.attention}", f"--compile={cfg.compile}", f"--dropout={cfg.dropout}",
                   f"--out_dir={Path(tmp) / 'out'}", f"--profile={cfg.profile}", f"--peak_tflops={cfg.peak_tflops}"]
            print(" ".join(cmd[1:]), flush=True)
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            print(result.stdout if cfg.profile else result.stdout[-1500:],
                  result.stderr[-1500:] if result.returncode else "", flush=True)
            measured = [m for m in LOG.finditer(result.stdout) if int(m.group(1)) > first]
            if result.returncode or not measured:
                rows.append((preset, batch, "failed", "", "", ref_tok_s, ref_mfu))
                continue
            tok_s = float(np.median([float(m.group(2).replace(",", "")) for m in measured]))
            mfu = float(np.median([float(m.group(3)) for m in measured]))
            mem = max(float(m.group(4)) for m in measured)
            rows.append((preset, batch, f"{tok_s:,.0f}", f"{mfu:.1f}", f"{mem:.1f}", ref_tok_s, ref_mfu))
    print(f"\ntraining throughput on one {device}, bf16, context 2048, attention={cfg.attention}, "
          f"compile={cfg.compile}, dropout={cfg.dropout} (median of the steady log intervals)")
    print("ref: DESIGN.md's figures, a nanoGPT-style GPT with torch.compile and SDPA on one H200 (MFU compares "
          "across cards; tok/s only on an H200)")
    print(f"{'preset':<12} {'batch':>5} {'tok/s':>10} {'MFU %':>6} {'mem GiB':>8} | "
          f"{'ref tok/s':>10} {'ref MFU %':>9} | {'MFU/ref':>7}")
    for preset, batch, tok_s, mfu, mem, ref_tok_s, ref_mfu in rows:
        ratio = f"{float(mfu) / ref_mfu:.2f}x" if mfu else ""
        print(f"{preset:<12} {batch:>5} {tok_s:>10} {mfu:>6} {mem:>8} | {ref_tok_s:>10,} {ref_mfu:>9.1f} | {ratio:>7}")
    failed = [row[0] for row in rows if row[2] == "failed"]
    if failed:  # a table with holes is no result: say so to the shell too
        sys.exit(f"error: {', '.join(failed)} failed (train.py's output above says why)")


if __name__ == "__main__":
    run(main)
