"""train.py: schedule, optimizer groups, learning, exact resume, DDP, bad input."""

import copy
import fcntl
import json
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from config import UserError, parse_args, parse_settings
from model import GPT, PRESETS, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def make_dataset(folder: Path, n_tokens: int = 20_000, seed: int = 0) -> Path:
    """Token bins with structure to learn: a few dozen "words" of 3-6 tokens in random order."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, 2000, size=rng.integers(3, 7)) for _ in range(40)]
    stream = np.concatenate([words[i] for i in rng.integers(0, len(words), size=n_tokens // 3)])
    folder.mkdir(parents=True, exist_ok=True)
    split = int(0.9 * len(stream))
    stream[:split].astype(np.uint16).tofile(folder / "train.bin")
    stream[split:].astype(np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"train_tokens": split}))
    return folder


def settings(**overrides):
    base = dict(preset="nano", batch_size=4, max_iters=20, warmup_iters=2, eval_interval=1000,
                eval_iters=2, log_interval=5, checkpoint_interval=1000, sample_tokens=0, seed=3,
                learning_rate=3e-3)
    cfg, _ = parse_args(train.DEFAULTS, argv=[f"--{k}={v}" for k, v in {**base, **overrides}.items()])
    return cfg


class FixedRows:
    """The same two rows every step, the first counting 2 targets and the second all of
    its: a step of one batch of 2 and a step of two batches of 1 read the same rows."""
    names = ["fixed"]

    def __init__(self, block_size: int, counted_in_first: int = 2, counted_in_second: int | None = None):
        rng = np.random.default_rng(0)
        self.x, self.y = rng.integers(0, 2000, size=(2, 2, block_size))
        self.y[0, counted_in_first:] = -1
        self.y[1, block_size if counted_in_second is None else counted_in_second:] = -1

    def batch(self, split, seed, step, rows, only=None):
        return self.x[rows.start:rows.stop], self.y[rows.start:rows.stop]

    def counted(self, seed, step, rows):
        return int((self.batch("train", seed, step, rows)[1] != -1).sum())


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_learning_rate_warms_up_then_decays_linearly():
    cfg = settings(max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr=0.1)
    lrs = [train.learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert train.learning_rate(100, cfg) == pytest.approx(0.1)


def test_weight_decay_applies_to_matrices_only():
    model = GPT(PRESETS["nano"])
    decayed, plain = train.make_optimizer(model, settings(), torch.device("cpu")).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_windows_reach_every_token_and_a_short_bin_repeats(tmp_path):
    for split, n in (("train", 18), ("val", 5)):  # windows of 16 + 1 tokens fit train.bin two ways; val.bin is short
        np.arange(1, n + 1, dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    (tmp_path / "meta.json").write_text("{}")
    mixture = train.Mixture(str(tmp_path), 16, 51200, prepare_default=False)
    x, y = mixture.batch("train", 0, 0, range(64))
    assert {int(row[0]) for row in x} == {1, 2} and y.max() == 18  # the last token is a target too
    assert np.array_equal(y[:, :-1], x[:, 1:])
    x, y = mixture.batch("val", 0, 0, range(4))
    assert x.shape == y.shape == (4, 16) and list(x[0, :7]) == [1, 2, 3, 4, 5, 1, 2]


def test_data_prepared_again_during_a_run_is_not_read_by_it(tmp_path):
    """Each row opened its bin by name: a dataset prepared again under the same name while a
    run trained on it was read from then on without a word (the run's recorded data no longer
    what it trained on), and one prepared as JSONL (train.bin removed) ended it in a traceback."""
    data = make_dataset(tmp_path / "ds")
    mixture = train.Mixture(str(data), 16, 51200, prepare_default=False)
    before = mixture.batch("train", 0, 0, range(8)), mixture.batch("val", 0, 0, range(8))
    np.full(40_000, 7, dtype=np.uint16).tofile(tmp_path / "new.bin")
    os.replace(tmp_path / "new.bin", data / "train.bin")  # as prepare.py replaces a bin
    (data / "val.bin").unlink()
    after = mixture.batch("train", 0, 0, range(8)), mixture.batch("val", 0, 0, range(8))
    assert all(np.array_equal(a, b) for x, y in zip(before, after) for a, b in zip(x, y))


def test_a_bin_cut_short_is_named(tmp_path):
    data = make_dataset(tmp_path / "ds")
    with open(data / "train.bin", "ab") as f:
        f.write(b"\x01")  # half a token: a copy cut short
    with pytest.raises(UserError, match="train.bin is cut short"):
        train.Mixture(str(data), 16, 51200, prepare_default=False)


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint(path, GPT(PRESETS["nano"]), 1, settings())
    before = path.read_bytes()

    def disk_full(obj, f):  # what torch.save does on a full disk: some bytes, then an error
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8128 vs 8022")

    monkeypatch.setattr(train.torch, "save", disk_full)
    with pytest.raises(UserError, match=r"cannot write .*ckpt.pt: .*unexpected pos.* \(\d+\.\d GiB free there\); "
                                        r"the last checkpoint, if any, is intact"):
        train.save_checkpoint(path, GPT(PRESETS["nano"]), 2, settings())
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]

    def cuda_error(obj, f):  # not the disk: a bug to see whole, not one line about writing
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train.torch, "save", cuda_error)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train.save_checkpoint(path, GPT(PRESETS["nano"]), 2, settings())
    assert path.read_bytes() == before


def test_a_few_steps_lower_the_loss(tmp_path):
    data = make_dataset(tmp_path / "ds")
    cfg = settings(data=str(data), out_dir=str(tmp_path / "out"), max_iters=30)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    trained = train.train(cfg)
    # SIGTERM and Ctrl-C are back as they were: a process that goes on (and the pools it forks) can stop
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    torch.manual_seed(cfg.seed)
    untrained = GPT(PRESETS["nano"])
    mixture = train.Mixture(str(data), 64, 51200, prepare_default=False)
    x, y = map(torch.from_numpy, mixture.batch("val", 0, 0, range(8)))
    with torch.no_grad():
        before, after = untrained(x, y)[1].item(), trained.eval()(x, y)[1].item()
    assert after < before - 2.0, (before, after)
    assert (tmp_path / "out" / "ckpt.pt").exists()


def test_the_score_runs_in_the_training_precision(tmp_path):
    # finetune.py's HumanEval check: bf16 weights like evaluate.py's, not the float32 master weights
    seen = []

    def score(model):
        seen.append((model.lm_head.weight.dtype, torch.is_autocast_enabled("cpu"), model.training))
        return "probe", float(len(seen))

    cfg = settings(data=str(make_dataset(tmp_path / "ds")), out_dir=str(tmp_path / "out"), max_iters=4,
                   eval_interval=2, dtype="bfloat16")
    trained = train.train(cfg, score=score)
    assert seen and all(s == (torch.bfloat16, False, False) for s in seen), seen
    assert trained.lm_head.weight.dtype == torch.float32  # the copy was scored; training went on in float32
    assert (tmp_path / "out" / "best.pt").exists()


def test_inference_copy_is_the_cast_model_and_shares_nothing():
    torch.manual_seed(0)
    model = GPT(PRESETS["nano"]).train()
    model(torch.randint(0, 100, (1, 8)), torch.randint(0, 100, (1, 8)))[1].backward()
    cast = copy.deepcopy(model).to(torch.bfloat16)  # what it stands for, at twice the memory
    scored = train.inference_copy(model, torch.bfloat16)
    assert scored.state_dict().keys() == cast.state_dict().keys()
    assert all(torch.equal(scored.state_dict()[k], v) for k, v in cast.state_dict().items())
    assert torch.equal(scored.rotary, cast.rotary) and scored.rotary.dtype == torch.bfloat16
    assert all(not p.requires_grad and p.grad is None for p in scored.parameters())
    with torch.no_grad():
        scored.lm_head.bias.fill_(7.0)
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.bias.abs().max() < 7.0
    assert all(p.requires_grad and p.grad is not None for p in model.parameters())


def test_mixture_draws_by_weight(tmp_path):
    a = make_dataset(tmp_path / "a", seed=1)
    b = tmp_path / "b"
    b.mkdir()
    for split in ("train", "val"):  # dataset b holds only token 7
        np.full(5000, 7, dtype=np.uint16).tofile(b / f"{split}.bin")
    (b / "meta.json").write_text("{}")
    mixture = train.Mixture(f"{a}:0.75,{b}:0.25", 16, 51200, prepare_default=False)
    rows = np.concatenate([mixture.batch("train", 0, step, range(64))[0] for step in range(20)])
    from_b = (rows == 7).all(axis=1).mean()
    assert 0.18 < from_b < 0.32
    # row i of a step is the same in whatever batch holds it: processes and micro-steps split a step as they like
    again = mixture.batch("train", 0, 3, range(64))[0]
    assert np.array_equal(again, np.concatenate([mixture.batch("train", 0, 3, range(i, i + 8))[0]
                                                 for i in range(0, 64, 8)]))
    for seed, step in ((0, 4), (1, 3)):
        assert not np.array_equal(again, mixture.batch("train", seed, step, range(64))[0])
    by_size = train.Mixture(f"{a},{b}", 16, 51200, prepare_default=False)  # no weights: train tokens
    a_tokens = (a / "train.bin").stat().st_size // 2
    assert np.allclose(by_size.weights, [a_tokens / (a_tokens + 5000), 5000 / (a_tokens + 5000)])
    with pytest.raises(UserError, match="give every dataset a weight, or none"):
        train.Mixture(f"{a}:2,{b}", 16, 51200, prepare_default=False)


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    """An uninterrupted run, with dropout on so the random streams matter too."""
    tmp = tmp_path_factory.mktemp("resume")
    data = make_dataset(tmp / "ds")
    args = [f"--data={data}", "--preset=nano", "--dropout=0.1", "--batch_size=4", "--max_iters=40",
            "--warmup_iters=4", "--checkpoint_interval=5", "--log_interval=5", "--eval_interval=1000",
            "--eval_iters=2", "--sample_tokens=0", "--seed=5"]
    done = cli(*args, f"--out_dir={tmp / 'straight'}")
    assert done.returncode == 0, done.stderr
    return tmp, args, torch.load(tmp / "straight" / "ckpt.pt", weights_only=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_a_kill_continues_exactly(resume_setup, sig):
    tmp, args, straight = resume_setup
    out = tmp / f"killed-{sig.name}"
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), *args, f"--out_dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # stop it right after its first checkpoint
        if line.startswith("saved"):
            proc.send_signal(sig)
            break
    proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert stopped_at < 40, "the run ended before it could be stopped"
    resumed = cli(*args, f"--out_dir={out}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out / 'ckpt.pt'} from step {stopped_at}" in resumed.stdout
    final = torch.load(out / "ckpt.pt", weights_only=True)
    assert final["step"] == 40
    for name, tensor in straight["model"].items():
        assert torch.equal(final["model"][name], tensor), name


def test_a_closed_terminal_saves_and_stops_the_run_but_not_under_nohup(resume_setup):
    """SIGHUP (a terminal or ssh session closed; torchrun passes it on) killed the run
    without a save. The terminal gone, every print to it fails (EIO), the save's too."""
    tmp, args, straight = resume_setup
    command = [sys.executable, "-u", str(ROOT / "train.py"), *args]
    leader, follower = pty.openpty()
    out = tmp / "hung-up"
    proc = subprocess.Popen([*command, f"--out_dir={out}"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower, start_new_session=True,  # the pty: its controlling terminal
                            preexec_fn=lambda: fcntl.ioctl(1, termios.TIOCSCTTY, 0))
    os.close(follower)
    seen = b""
    while b"saved" not in seen:  # its first checkpoint
        seen += os.read(leader, 4096)
    os.close(leader)  # the terminal hangs up: the kernel sends SIGHUP
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    assert 5 < torch.load(out / "ckpt.pt", weights_only=True)["step"] < 40  # saved at the signal, not at step 5

    # `python train.py 2>&1 | tee log`: a hang-up, or the terminal's Ctrl-C, ends tee too, and a print
    # then fails (EPIPE): the handler's own, or the next step's log line
    for stop in (signal.SIGHUP, signal.SIGINT):
        out = tmp / f"piped-{stop.name}"
        proc = subprocess.Popen([*command, "--log_interval=1", f"--out_dir={out}"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            if line.startswith(b"saved"):
                proc.stdout.close()
                proc.send_signal(stop)
                break
        assert proc.wait(timeout=120) == 128 + stop
        assert 5 < torch.load(out / "ckpt.pt", weights_only=True)["step"] < 40

    out = tmp / "nohup"
    proc = subprocess.Popen([*command, f"--out_dir={out}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    for line in proc.stdout:
        if line.startswith("saved"):
            proc.send_signal(signal.SIGHUP)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 0 and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 40


def test_stop_iters_ends_early_on_max_iters_schedule_and_goes_on_later(resume_setup):
    """The paper's phi-1-base: step 24000 of a 36000-step schedule."""
    tmp, args, straight = resume_setup
    out = tmp / "stopped"
    for _ in range(2):  # the second run finds the work done
        stopped = cli(*args, "--stop_iters=25", f"--out_dir={out}")
        assert stopped.returncode == 0, stopped.stderr
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 25
    assert "already finished 25 steps" in stopped.stdout
    rest = cli(*args, f"--out_dir={out}")
    assert rest.returncode == 0, rest.stderr
    final = torch.load(out / "ckpt.pt", weights_only=True)
    assert final["step"] == 40
    for name, tensor in straight["model"].items():
        assert torch.equal(final["model"][name], tensor), name


class ThirdsMasked(train.Mixture):
    """A Mixture whose loss skips the targets divisible by 3, as finetuning skips prompts:
    micro-steps, and processes, count different numbers of targets."""

    def batch(self, *args, **kwargs):
        x, y = super().batch(*args, **kwargs)
        return x, np.where(y % 3 == 0, -1, y)

    def counted(self, seed, step, rows):
        return int((self.batch("train", seed, step, rows)[1] != -1).sum())


class SameBatch:
    """One batch, whatever is asked."""

    def __init__(self, mixture):
        self.names, self.fixed = mixture.names, mixture.batch("train", 0, 0, range(4))

    def batch(self, *args, **kwargs):
        return self.fixed

    def counted(self, *args):
        return int((self.fixed[1] != -1).sum())


def test_torchrun_ddp_keeps_replicas_identical_and_goes_on_from_one_process_as_one_process_would(tmp_path, capsys):
    """Steps 1-3 on one process in 4 micro-steps, steps 4-6 resumed on 2 processes in 2
    each: the same weights and losses as one process taking each step as one batch of 8.
    A step reads the same rows however it is split, and every counted target of a step,
    in any micro-step on either process, weighs the same."""
    data = make_dataset(tmp_path / "ds")
    script = tmp_path / "ddp_run.py"
    script.write_text(f"""
import os, sys, torch
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
import train
from config import parse_args
from test_train import ThirdsMasked
cfg, _ = parse_args(train.DEFAULTS, argv=sys.argv[1:])
model = train.train(cfg, make_data=lambda c: ThirdsMasked(cfg.data, c.block_size, c.vocab_size, prepare_default=False))
os.makedirs(cfg.out_dir, exist_ok=True)  # rank 0 may not have written its checkpoint yet
torch.save(model.state_dict(), os.path.join(cfg.out_dir, f"rank{{os.environ['RANK']}}.pt"))
""")
    out = tmp_path / "out"
    args = [f"--data={data}", "--preset=nano", "--batch_size=2", "--total_batch_size=8", "--max_iters=6",
            "--warmup_iters=1", "--log_interval=3", "--eval_interval=1000", "--eval_iters=1",
            "--sample_tokens=0", "--seed=3"]

    def one_process(*more):
        cfg, _ = parse_args(train.DEFAULTS, argv=[*args, *more])
        return train.train(cfg, make_data=lambda c: ThirdsMasked(str(data), c.block_size, c.vocab_size,
                                                                 prepare_default=False))

    one_process("--stop_iters=3", f"--out_dir={out}")
    first_half = capsys.readouterr().out
    assert "(4 micro-step(s) of 2 per process)" in first_half
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         *args, f"--out_dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "(2 micro-step(s) of 2 per process)" in result.stdout
    assert "resuming" in result.stdout and "warning" not in result.stderr, result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    torch.manual_seed(3)
    initial = GPT(PRESETS["nano"]).state_dict()
    assert not torch.equal(rank0["lm_head.weight"], initial["lm_head.weight"])  # it trained
    alone = one_process("--batch_size=8", f"--out_dir={tmp_path / 'one'}")
    # and logs the same losses: the mean over every counted target of the step, on both processes
    losses = [re.findall(r"step \d+ \| loss ([\d.]+)", text)
              for text in (first_half + result.stdout, capsys.readouterr().out)]
    assert len(losses[0]) == 2 and losses[0] == losses[1], losses
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(rank0[name], tensor, rtol=1e-4, atol=1e-4, msg=name)  # micro-steps weighed alike: fails


def test_processes_wait_for_process_0_to_validate_score_and_save_an_hour_not_nccls_ten_minutes(monkeypatch):
    """Process 0 scores HumanEval (finetune.py) while the others wait in an all-reduce: NCCL's
    default limit of 10 minutes ended such runs."""
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    assert train.setup_processes("cpu") == (1, 2, torch.device("cpu"))
    assert calls == [dict(backend="gloo", timeout=train.DDP_TIMEOUT)] and train.DDP_TIMEOUT.total_seconds() >= 3600


def test_a_mistake_under_torchrun_is_one_line_from_one_process(tmp_path):
    """Process 0 reads the checkpoint first while process 1 waits in a collective: process 1
    printed a traceback of the broken connection when process 0 exited with its error."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), "--preset=nano", f"--out_dir={out}", f"--data={tmp_path / 'absent'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert ours == [f"error: cannot resume: {out / 'ckpt.pt'} is not a readable checkpoint (not a file of tensors "
                    f"that torch.save wrote)"], result.stderr[-3000:]


BY_RANK = """
import os, runpy, sys
script = sys.argv.pop(1)  # its arguments' RANK as this process's rank: nodes whose files differ
sys.argv = [script] + [arg.replace("RANK", os.environ["RANK"]) for arg in sys.argv[1:]]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def test_processes_that_read_different_data_are_refused_in_one_line(tmp_path):
    """Each node reads --data from its own disk: one whose copy differed trained on it without a word."""
    make_dataset(tmp_path / "ds0")
    make_dataset(tmp_path / "ds1", n_tokens=30_000, seed=5)
    (tmp_path / "by_rank.py").write_text(BY_RANK)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "by_rank.py",
         str(ROOT / "train.py"), "--data=dsRANK", "--preset=nano", "--batch_size=2", "--max_iters=2",
         "--eval_interval=0", "--sample_tokens=0", f"--out_dir={tmp_path / 'out'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    tokens = (tmp_path / "ds0" / "train.bin").stat().st_size // 2
    assert result.returncode != 0 and ours == [
        f"error: processes read different data (process 0: {tokens:,} train tokens in ds0): --data must hold the "
        f"same prepared files on every node"], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    # out_dir on each node's own disk: one holds a checkpoint, the other none
    common = ["--preset=nano", "--batch_size=2", "--eval_interval=0", "--sample_tokens=0",
              f"--data={tmp_path / 'ds0'}"]
    assert cli(*common, "--max_iters=2", f"--out_dir={tmp_path / 'out0'}").returncode == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "by_rank.py",
         str(ROOT / "train.py"), *common, "--max_iters=4", "--out_dir=outRANK"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert result.returncode != 0 and ours == [
        "error: processes resume from different steps (0 to 2): --out_dir must be one folder that every node "
        "shares"], result.stderr[-3000:]


@pytest.mark.parametrize("fail, more, said", [
    ("batch 0", [], r"a bad batch at step 0 on process 1"),
    ("batch 3", [], r"a bad batch at step 3 on process 1"),  # in the loop: process 0 waits in an all-reduce
    ("val", ["--eval_interval=2"], r"a bad val batch at step 0"),  # process 0 validates alone
    ("save", ["--checkpoint_interval=2", "--eval_interval=2"], r"cannot write .*ckpt\.pt: no space left"),
    ("", ["--learning_rate=1e25", "--grad_clip=0"], r"the loss became inf or nan at step \d+: training diverged .*"),
    ("", ["--lr=1"], r"unknown setting --lr \(did you mean --learning_rate\?\)"),
    # out of memory on one process is its alone: the other, in an all-reduce, printed the broken connection's traceback
    ("oom 3", [], r"out of memory: lower --batch_size .*\(CUDA out of memory\. Tried to allocate 2\.00 GiB\)"),
])
def test_a_failure_of_one_process_is_one_line_and_stops_them_all(tmp_path, fail, more, said):
    """A UserError of one process in the training loop (bad data, a full disk) left the
    others in a collective, to print the broken connection's traceback; a mistake that every
    process makes (the command line, a diverged loss) was said once per process."""
    data = make_dataset(tmp_path / "ds")
    script = tmp_path / "failing.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
import train
from config import UserError, run

fail, rank = os.environ["PHI1_TEST_FAIL"], os.environ["RANK"]
real_batch, real_save = train.Mixture.batch, train.save_checkpoint

def batch(self, split, seed, step, rows, only=None):
    if fail == f"oom {{step}}" and split == "train" and rank == "1":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if fail == f"batch {{step}}" and split == "train" and rank == "1":
        raise UserError(f"a bad batch at step {{step}} on process 1")
    if fail == "val" and split == "val":
        raise UserError(f"a bad val batch at step {{step}}")
    return real_batch(self, split, seed, step, rows, only=only)

def save_checkpoint(path, *args, **kwargs):
    if fail == "save":
        raise UserError(f"cannot write {{path}}: no space left")
    return real_save(path, *args, **kwargs)

train.Mixture.batch, train.save_checkpoint = batch, save_checkpoint
run(train.main)
""")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         f"--data={data}", "--preset=nano", "--batch_size=2", "--max_iters=8", "--warmup_iters=1",
         "--log_interval=1000", "--checkpoint_interval=1000", "--eval_interval=0", "--eval_iters=1",
         "--sample_tokens=0", f"--out_dir={tmp_path / 'out'}", *more],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PHI1_TEST_FAIL": fail})
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(ours) == 1 and re.fullmatch(f"error: {said}", ours[0]), result.stderr[-3000:]
    assert "step 2: val loss" not in result.stdout  # process 0 failed at step 2: no more validation, nor scores
    assert "saved" not in result.stdout  # no checkpoint at or after a failure (one read as a signal's was)


def test_mfu_divides_by_the_peak_of_the_card_by_its_full_name(monkeypatch):
    """An H200 NVL (835 TFLOP/s) was taken for an SXM H200 (989): its MFU read low."""
    for name, tflops in [("NVIDIA H200 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H800 PCIe", 756),
                         ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA A100-SXM4-80GB", 312), ("Tesla T4", None)]:
        monkeypatch.setattr(train.torch.cuda, "get_device_name", lambda device: name)
        peak = train.peak_flops(settings(), torch.device("cuda"))
        assert peak == (tflops and tflops * 1e12), name
    assert train.peak_flops(settings(peak_tflops=100.0), torch.device("cuda")) == 100e12


def test_gradient_accumulation_averages_micro_steps(tmp_path, capsys):
    # The same batch twice in 2 micro-steps is the same gradient and loss as once in 1.
    data = str(make_dataset(tmp_path / "ds"))
    models, losses = [], []
    for total in (4, 8):
        cfg = settings(data=data, out_dir=str(tmp_path / f"out{total}"), batch_size=4, total_batch_size=total,
                       max_iters=2, log_interval=1, grad_clip=0.0)
        models.append(train.train(cfg, make_data=lambda c: SameBatch(
            train.Mixture(data, c.block_size, c.vocab_size, prepare_default=False))))
        losses.append(re.findall(r"step \d+ \| loss ([\d.]+)", capsys.readouterr().out))
    assert len(losses[0]) == 2 and losses[0] == losses[1], losses
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["preset", "flag", "data", "checkpoint", "token_ids", "diverged"])
def test_bad_input_gives_one_clear_line(tmp_path, case):
    data = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    args = [f"--data={data}", "--preset=nano", f"--out_dir={out}", "--max_iters=10", "--eval_interval=1000",
            "--sample_tokens=0", "--log_interval=1", "--warmup_iters=1"]
    expected = {"preset": "unknown preset", "flag": "unknown setting --bogus", "data": "no prepared data",
                "checkpoint": "cannot resume", "token_ids": "outside the model's vocabulary",
                "diverged": "training diverged"}[case]
    if case == "preset":
        args.append("--preset=huge")
    elif case == "flag":
        args.append("--bogus=1")
    elif case == "data":
        args[0] = f"--data={tmp_path / 'nowhere'}"
    elif case == "checkpoint":
        out.mkdir()
        (out / "ckpt.pt").write_bytes(b"\x80garbage")
        args.append("--init_from=resume")
    elif case == "token_ids":
        np.full(5000, 60000, dtype=np.uint16).tofile(data / "train.bin")
    elif case == "diverged":
        args.append("--learning_rate=1e9")
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    if case == "checkpoint":
        assert (out / "ckpt.pt").read_bytes() == b"\x80garbage"
    else:
        assert not (out / "ckpt.pt").exists()


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=0), "--batch_size must be positive"),
    (dict(log_interval=0), "--log_interval must be positive"),
    (dict(max_iters=0), "--max_iters must be positive"),
    (dict(out_dir=""), "--out_dir must name a folder"),
    (dict(eval_interval=5, eval_iters=0), "--eval_iters must be positive"),
    (dict(total_batch_size=-2), "--total_batch_size must not be negative"),
    (dict(seed=-1), "--seed must not be negative"),
    (dict(block_size="abc"), "--block_size must be a positive"),
    (dict(block_size=-4), "--block_size must be a positive"),
    (dict(dropout=1.5), "--dropout must be a number in"),
    (dict(dropout="abc"), "--dropout must be a number in"),
    (dict(device="foo"), "unknown --device=foo"),
    (dict(device="cuda:99"), "--device=cuda:99, but this machine has"),
    (dict(profile=True, max_iters=8), "--profile traces steps 8 to 10 of this run: it needs 10 steps to go, not 8"),
    (dict(seed=2**64), "--seed must be below 2\\*\\*63"),
    (dict(stop_iters=30), "--stop_iters \\(30\\) must not be above --max_iters \\(20\\)"),
    (dict(max_iters=10**19), "--max_iters must be below 2\\*\\*62"),  # was a torch overflow traceback
    (dict(learning_rate=1e39), "--learning_rate and --min_lr must be below 1e30"),  # was AdamW's traceback
    (dict(learning_rate=1e-4, min_lr=1e-2), "--min_lr \\(0.01\\) must not be above --learning_rate"),  # it climbed
    (dict(data="DATA:nan"), "weights must be positive numbers"),
    (dict(out_dir="A_FILE"), "cannot write .*a_file is a file, not a folder"),
    (dict(learning_rate=0), "--learning_rate must be positive"),  # was a run that trained nothing
])
def test_settings_that_cannot_train_stop_before_training(tmp_path, bad, message, monkeypatch):
    data = make_dataset(tmp_path / "ds")
    (tmp_path / "a_file").write_text("")
    bad = {k: str(v).replace("DATA", str(data)).replace("A_FILE", str(tmp_path / "a_file"))
           for k, v in bad.items()}
    cfg = settings(**{"data": str(data), "out_dir": str(tmp_path / "out"), **bad})
    if "out_dir" in bad:  # said before the model and the data are made ready (minutes, for the default corpus)
        monkeypatch.setattr(train, "build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(UserError, match=message):
        train.train(cfg)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_run_from_weights_resumes_its_own_checkpoint(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    base = tmp_path / "base.pt"
    train.save_checkpoint(base, GPT(PRESETS["nano"]), 0, settings())
    cfg = dict(data=str(data), out_dir=str(tmp_path / "out"), init_from=str(base), checkpoint_interval=5)
    train.train(settings(**cfg, max_iters=5))
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["origin"] == str(base.resolve())
    assert "(the weights' own model: --preset=nano does not apply)" in capsys.readouterr().out
    train.train(settings(**cfg, max_iters=10))  # as after a SIGTERM at step 5: the same command again
    assert f"resuming {tmp_path / 'out' / 'ckpt.pt'} from step 5" in capsys.readouterr().out
    with pytest.raises(UserError, match="started from .*base.pt, not from"):
        train.train(settings(**{**cfg, "init_from": str(tmp_path / "other.pt")}, max_iters=20))


def test_a_finetune_run_is_not_resumed_by_train(tmp_path):
    out, data = tmp_path / "out", str(make_dataset(tmp_path / "ds"))
    train.train(settings(data=data, out_dir=str(out), max_iters=2, checkpoint_interval=2))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["settings"]["exercises"] = "ex.jsonl"  # finetune.py's own setting: as its run would have saved it
    torch.save(ckpt, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match="holds a finetune.py run: resume it with finetune.py, or use another"):
        train.train(settings(data=data, out_dir=str(out), max_iters=4))
    assert (out / "ckpt.pt").read_bytes() == before


def test_one_process_saves_and_stops_at_the_step_after_a_signal(tmp_path, monkeypatch):
    data = train.Mixture(str(make_dataset(tmp_path / "ds")), 64, 51200, prepare_default=False)

    class SignalledData:  # SIGTERM arrives while step 3 runs
        names = data.names

        def batch(self, split, seed, step, rows, only=None):
            if split == "train" and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return data.batch(split, seed, step, rows, only=only)

        counted = data.counted

    monkeypatch.setattr(train, "_stop_signal", None)
    with pytest.raises(SystemExit) as stopped:
        train.train(settings(out_dir=str(tmp_path / "out"), log_interval=100, checkpoint_interval=100,
                             max_iters=50), make_data=lambda config: SignalledData())
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] <= 4


@pytest.mark.parametrize("during", ["validation", "score"])
def test_a_signal_during_a_validation_stops_it_and_saves_at_once(tmp_path, monkeypatch, during):
    """The validation and score (finetune.py's HumanEval: minutes) ran to their end, and a
    step more, before the save: past the grace period of a cluster's SIGTERM."""
    data = train.Mixture(str(make_dataset(tmp_path / "ds")), 64, 51200, prepare_default=False)
    val_batches = []

    class SignalledData:  # SIGTERM arrives while step 4 is validated
        names = data.names

        def batch(self, split, seed, step, rows, only=None):
            if split == "val":
                val_batches.append(rows)
                if during == "validation" and len(val_batches) == 50 + 3:
                    os.kill(os.getpid(), signal.SIGTERM)
            return data.batch(split, seed, step, rows, only=only)

        counted = data.counted

    scored = []

    def score(model):
        scored.append(1)
        if during == "score" and len(scored) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # a long score
        return "fake", 0.0

    monkeypatch.setattr(train, "_stop_signal", None)
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        train.train(settings(out_dir=str(tmp_path / "out"), eval_interval=4, eval_iters=50, checkpoint_interval=100,
                             max_iters=50), make_data=lambda config: SignalledData(), score=score)
    assert stopped.value.code == 128 + signal.SIGTERM and time.monotonic() - started < 50
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["score_due"]  # a rerun validates and scores step 4 first
    assert len(val_batches) == (53 if during == "validation" else 100)


def test_weights_that_went_nan_are_not_saved_over_the_last_checkpoint(tmp_path, monkeypatch):
    """A gradient of inf whose loss is finite (an overflow in the backward) makes the weights
    nan; the loss shows it a step later, after a checkpoint of those weights replaced the good one."""
    clipped, clip = [], torch.nn.utils.clip_grad_norm_

    def overflowing_clip(parameters, max_norm):
        parameters = list(parameters)
        clipped.append(1)
        if len(clipped) == 4:  # step 4's update
            parameters[0].grad.fill_(float("inf"))
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing_clip)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"^the weights became inf or nan in step 4: training diverged; .*ckpt.pt keeps "
                                        r"the checkpoint before"):
        train.train(settings(data=str(make_dataset(tmp_path / "ds")), out_dir=str(out), checkpoint_interval=2,
                             max_iters=6))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_block_size_and_dropout_apply_to_loaded_weights(tmp_path):
    data = make_dataset(tmp_path / "ds")
    base = tmp_path / "base.pt"
    train.save_checkpoint(base, GPT(PRESETS["nano"]), 0, settings())
    model = train.train(settings(data=str(data), out_dir=str(tmp_path / "out"), init_from=str(base),
                                 block_size=32, dropout=0.1, max_iters=2))
    assert (model.config.block_size, model.config.dropout, model.rotary.shape[0]) == (32, 0.1, 32)
    with pytest.raises(UserError, match=r"another model than this run asks for: block_size 32 \(asked: 48\);"):
        train.train(settings(data=str(data), out_dir=str(tmp_path / "out"), init_from=str(base),
                             block_size=48, max_iters=4))


@pytest.mark.parametrize("damage, message", [
    ("an index without weight_map", "model.safetensors.index.json has no weight_map"),
    ("tensors of other sizes than config.json", "the tensors do not fit the model their config describes"),
    ("a vocabulary smaller than the tokenizer's", "its vocabulary of 512 ids is smaller than the tokenizer's 50295"),
])
def test_weights_to_start_from_that_cannot_be_used_are_one_line(tmp_path, damage, message):
    """--init_from (and finetune.py's --base) give the line that sample.py's --ckpt gives, not a traceback."""
    folder = tmp_path / "hf"
    vocab = 512 if "vocabulary" in damage else 51200
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=vocab, rotary_dim=8)
    GPT(config).save_pretrained(folder)
    if "index" in damage:
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    elif "config.json" in damage:
        hf_config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**hf_config, "hidden_size": 64, "intermediate_size": 256}))
    cfg = settings(data=str(make_dataset(tmp_path / "ds")), out_dir=str(tmp_path / "out"), init_from=str(folder),
                   max_iters=2)
    with pytest.raises(UserError, match=f"^cannot (load|use) {re.escape(str(folder))}: .*{message}"):
        train.train(cfg)


def test_weights_without_dropout_say_so_as_training_starts(tmp_path, capsys):
    """Hugging Face's phi configs hold dropout 0.0: finetuning from them trained without it,
    silently, where phi-1 trained and was finetuned with 0.1."""
    folder = tmp_path / "hf"
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, rotary_dim=8)).save_pretrained(folder)
    data = str(make_dataset(tmp_path / "ds"))
    for dropout, said in ((None, True), (0.1, False)):
        train.train(settings(data=data, out_dir=str(tmp_path / f"out{dropout}"), init_from=str(folder), max_iters=1,
                             **({"dropout": dropout} if dropout else {})))
        assert ("has no dropout, and trains without" in capsys.readouterr().err) == said


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 9000000000 bytes")])
def test_out_of_memory_is_one_line_with_what_to_lower(tmp_path, monkeypatch, error):
    data = make_dataset(tmp_path / "ds")

    def forward_raising(e):
        def forward(*args, **kwargs):
            raise e
        return forward

    monkeypatch.setattr(train.GPT, "forward", forward_raising(error))
    with pytest.raises(UserError, match=r"out of memory: lower --batch_size .* or --block_size \(.*allocate 9"):
        train.train(settings(data=str(data), out_dir=str(tmp_path / "out"), max_iters=2))
    with pytest.raises(UserError) as finetuning:  # finetune.py (its own data) has no --block_size to lower
        train.train(settings(data=str(data), out_dir=str(tmp_path / "out1"), max_iters=2),
                    make_data=lambda c: train.Mixture(str(data), c.block_size, c.vocab_size, prepare_default=False))
    assert "--batch_size" in str(finetuning.value) and "--block_size" not in str(finetuning.value)
    monkeypatch.setattr(train.GPT, "forward", forward_raising(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other error stays a traceback to see
        train.train(settings(data=str(data), out_dir=str(tmp_path / "out2"), max_iters=2))



def test_a_batch_far_too_large_for_memory_is_the_out_of_memory_line_at_once(tmp_path):
    """Its rows were gathered one by one into a list: --batch_size=1e12 ran for ever, growing."""
    data = make_dataset(tmp_path / "ds")
    with pytest.raises(UserError, match=r"out of memory: lower --batch_size"):
        train.train(settings(data=str(data), out_dir=str(tmp_path / "out"), max_iters=1, batch_size=10**12,
                             eval_interval=0))


def test_a_float16_run_resumes_a_bfloat16_one_and_the_batch_and_schedule_changes_are_named(tmp_path, capsys):
    """The bf16 run saved a disabled gradient scaler, whose empty state a float16 one refused (a traceback:
    a run begun on an H100 and resumed on a V100). 0 as --total_batch_size follows the processes."""
    data = make_dataset(tmp_path / "ds")
    common = dict(data=str(data), out_dir=str(tmp_path / "out"), eval_interval=0, warmup_iters=1)
    train.train(settings(**common, max_iters=2, dtype="bfloat16", total_batch_size=8))
    capsys.readouterr()
    train.train(settings(**common, max_iters=4, dtype="float16"))
    err = capsys.readouterr().err
    assert "dtype used: float16 (was bfloat16)" in err
    assert "this run's steps are 4 sequences, the checkpoint's were 8: give --total_batch_size=8" in err
    assert "warning: with --max_iters=4 (was 2) the learning rate goes from 0.00e+00 to 2.00e-03 at step 2" in err


def test_a_float16_run_resumes_its_loss_scale(tmp_path):
    """A fresh scale in its place would step where the run's own skips (its gradients overflow)."""
    common = dict(data=str(make_dataset(tmp_path / "ds")), out_dir=str(tmp_path / "out"), eval_interval=0,
                  warmup_iters=1, dtype="float16", checkpoint_interval=1)
    train.train(settings(**common, max_iters=2))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["scaler"]["scale"] = 3e38  # every gradient overflows at this scale
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    train.train(settings(**common, max_iters=3))
    after = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert after["step"] == 3 and after["scaler"]["scale"] == pytest.approx(1.5e38)  # skipped, the scale halved
    assert all(torch.equal(after["model"][k], v) for k, v in ckpt["model"].items())


def test_a_resume_compares_the_dtype_that_dtype_auto_resolved_to(tmp_path, capsys):
    """--dtype=auto is float32 on a CPU: naming it resumes the same run (a warning said it changed),
    while a run of auto resumed on another device, where auto is another dtype, is warned of."""
    data = make_dataset(tmp_path / "ds")
    common = dict(data=str(data), out_dir=str(tmp_path / "out"), eval_interval=0, warmup_iters=1)
    train.train(settings(**common, max_iters=2, dtype="auto"))
    capsys.readouterr()
    train.train(settings(**common, max_iters=3, dtype="float32"))
    assert "resuming with other settings" not in capsys.readouterr().err
    train.train(settings(**common, max_iters=4, dtype="bfloat16"))
    assert "other settings than the run had: dtype used: bfloat16 (was float32)" in capsys.readouterr().err
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    checkpoint["settings"]["dtype_used"] = "bfloat16"  # as an H100 records auto
    torch.save(checkpoint, tmp_path / "out" / "ckpt.pt")
    train.train(settings(**common, max_iters=5, dtype="auto"))
    assert "dtype used: float32 (was bfloat16)" in capsys.readouterr().err


def test_datasets_of_another_tokenizer_or_dtype_and_a_missing_val_bin_are_named(tmp_path):
    data = make_dataset(tmp_path / "ds")
    cfg = settings(data=str(data), out_dir=str(tmp_path / "out"), eval_interval=5, max_iters=2)
    (data / "val.bin").unlink()
    with pytest.raises(UserError, match=r"^no val.bin in .*ds \(to train without validation: --eval_interval=0\)$"):
        train.train(cfg)
    for meta, message in [({"dtype": "uint32"}, "holds uint32 tokens; train.py reads uint16"),
                          ({"vocab_size": 50257}, "prepared with another tokenizer \\(50257 ids, phi-1's has 50295")]:
        (data / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(UserError, match=message):
            train.train(settings(data=str(data), out_dir=str(tmp_path / "out"), eval_interval=0, max_iters=2))
    with pytest.raises(UserError, match="a dataset without a name in --data="):
        train.train(settings(data=f"{data},", out_dir=str(tmp_path / "out"), eval_interval=0, max_iters=2))


def test_no_checkpoints_is_warned_of(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    train.train(settings(data=str(data), out_dir=str(tmp_path / "out"), max_iters=2, checkpoint_interval=0))
    assert "warning: --checkpoint_interval=0: this run saves no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_warmup_as_long_as_the_run_or_longer_is_named(tmp_path, capsys):
    """A warmup of the run's length ends at the peak learning rate, never decaying: it was not named."""
    data = make_dataset(tmp_path / "ds")
    for warmup, peak in ((8, "7.50e-04"), (2, "3.00e-03")):
        train.train(settings(data=str(data), out_dir=str(tmp_path / f"out{warmup}"), max_iters=2,
                             warmup_iters=warmup, min_lr=1e-4))
        assert (f"warning: --warmup_iters={warmup} is as long as the run or longer (--max_iters=2): the learning "
                f"rate climbs to {peak} and never decays (to --min_lr=0.0001)") in capsys.readouterr().err


def test_a_resume_may_change_the_dropout_and_otherwise_keeps_the_runs(tmp_path, capsys):
    """Dropout is how the weights train, not what they are: a resume refused another --dropout
    (its way out, --init_from, lost the optimizer and the schedule), and rerunning the command
    without --dropout refused the preset's default."""
    data, out = str(make_dataset(tmp_path / "ds")), tmp_path / "out"
    train.train(settings(data=data, out_dir=str(out), max_iters=4, stop_iters=2, dropout=0.2))
    capsys.readouterr()
    model = train.train(settings(data=data, out_dir=str(out), max_iters=4, stop_iters=3))  # unsaid: the run's 0.2
    assert model.config.dropout == 0.2 and capsys.readouterr().err == ""
    model = train.train(settings(data=data, out_dir=str(out), max_iters=4, dropout=0))
    assert model.config.dropout == 0.0 and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    assert capsys.readouterr().err == "warning: resuming with other settings than the run had: --dropout=0 (was 0.2)\n"
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["dropout"] == 0.0


def test_no_validation_needs_no_val_data_and_a_small_context_still_samples(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    (data / "val.bin").write_bytes(b"")
    train.train(settings(data=str(data), out_dir=str(tmp_path / "out"), eval_interval=0, max_iters=2,
                         sample_tokens=100))  # nano's context of 64 tokens holds fewer
    assert "sample:\n" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"val.bin is empty: nothing to validate on \(to train without validation: "
                                        r"--eval_interval=0\)"):  # (prepare.py --val_fraction=0 writes one)
        train.train(settings(data=str(data), out_dir=str(tmp_path / "out2"), eval_interval=5))


def test_a_context_too_small_for_the_sample_prompt_says_so_and_one_just_fitting_samples(tmp_path, capsys):
    """A context that cannot hold the sample's prompt skipped the sample without a word; one
    holding the prompt exactly skipped it too, though generate() has room for one token."""
    import tokenizer
    data = str(make_dataset(tmp_path / "ds"))
    fits = len(tokenizer.encode(train.SAMPLE_PROMPT))
    train.train(settings(data=data, out_dir=str(tmp_path / "small"), eval_interval=0, max_iters=1,
                         block_size=fits - 1, sample_tokens=100))
    out, err = capsys.readouterr()
    assert "sample:" not in out and f"no sample: the context of {fits - 1} tokens cannot hold" in err
    train.train(settings(data=data, out_dir=str(tmp_path / "fits"), eval_interval=0, max_iters=1,
                         block_size=fits, sample_tokens=100))
    assert "sample:\n" in capsys.readouterr().out


def test_a_sample_that_overflows_is_a_note_after_a_run_that_is_done(tmp_path, capsys, monkeypatch):
    """generate() raises FloatingPointError where float16 overflows (a GPU without bfloat16):
    a traceback ended a run that had trained and saved."""
    def overflowing(self, *args, **kwargs):
        raise FloatingPointError("the logits went NaN or infinite in float16")

    monkeypatch.setattr(train.GPT, "generate", overflowing)
    data = str(make_dataset(tmp_path / "ds"))
    train.train(settings(data=data, out_dir=str(tmp_path / "out"), eval_interval=0, max_iters=1, sample_tokens=8))
    assert "note: no sample: the logits went NaN or infinite in float16" in capsys.readouterr().err
    assert (tmp_path / "out" / "ckpt.pt").is_file()


def test_config_parsing():
    cfg, rest = parse_args(train.DEFAULTS, argv=["--batch_size", "3", "--compile", "--dropout=0.2",
                                                 "--learning-rate=2e-3", "extra"])
    assert (cfg.batch_size, cfg.compile, cfg.dropout, cfg.learning_rate, rest) == (3, True, 0.2, 2e-3, ["extra"])
    for bad in (["--batch_size=x"], ["--compile=maybe"], ["--max_iters=1.5"], ["--nope"],
                ["--learning_rate=1e999"], ["--dropout=-1e999"], ["--max_iters=" + "9" * 400],
                ["--learning_rate=" + "9" * 400]):
        with pytest.raises(UserError):
            parse_args(train.DEFAULTS, argv=bad)
    with pytest.raises(UserError, match="unexpected argument 'extra'"):  # scripts that take settings only
        parse_settings(train.DEFAULTS, argv=["--batch_size=3", "extra"])


# ---------------------------------------------------------------- fast checks on a pico model

@pytest.fixture
def pico(monkeypatch):
    """A preset small enough (a 2048-token vocabulary, one layer) that a few steps take a fraction of a second."""
    monkeypatch.setitem(train.PRESETS, "pico", GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16,
                                                         vocab_size=2048, rotary_dim=8))
    return "pico"


class Recorded:
    """A Mixture that remembers every batch asked of it, as (split, step, rows, only);
    `then` runs after each."""

    def __init__(self, mixture, then=None):
        self.mixture, self.names, self.calls, self.then = mixture, mixture.names, [], then

    def batch(self, split, seed, step, rows, only=None):
        self.calls.append((split, step, rows, only))
        if self.then:
            self.then(split)
        return self.mixture.batch(split, seed, step, rows, only=only)

    def counted(self, seed, step, rows):
        return self.mixture.counted(seed, step, rows)


def recording(spec: str, then=None):
    """A make_data for train.train whose data, kept in .data, records every batch asked of it."""
    def make_data(c):
        make_data.data = Recorded(train.Mixture(spec, c.block_size, c.vocab_size, prepare_default=False), then)
        return make_data.data
    return make_data


def test_optimizer_takes_the_betas_in_order():
    """beta2 is the paper's 0.95 second-moment decay: swapped with beta1, Adam's step sizes go wrong."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=128, rotary_dim=8))
    for group in train.make_optimizer(model, settings(beta1=0.8, beta2=0.97), torch.device("cpu")).param_groups:
        assert group["betas"] == (0.8, 0.97)


def test_a_token_id_just_past_the_vocabulary_is_refused_naming_its_dataset(tmp_path, pico):
    """Id vocab_size itself is out of range too (the embedding has ids 0..vocab_size-1): the error
    must come before the model's index error, and name the dataset that holds it."""
    a = make_dataset(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    for split in ("train", "val"):
        np.full(100, 2048, dtype=np.uint16).tofile(b / f"{split}.bin")
    (b / "meta.json").write_text("{}")
    mixture = train.Mixture(f"{a}:0.5,{b}:0.5", 16, 2048, prepare_default=False)
    mixture.batch("train", 0, 0, range(4), only=0)  # dataset a is fine
    for step in range(6):  # rows of both datasets, in whatever order: b is the one named
        with pytest.raises(UserError, match=f"{re.escape(str(b))}/train.bin holds token id 2048, outside"):
            mixture.batch("train", 0, step, range(8))
    assert train.Mixture(str(b), 16, 2049, prepare_default=False).batch("val", 0, 0, range(2))[0].max() == 2048
    out = tmp_path / "runs" / "out"
    with pytest.raises(UserError, match="holds token id 2048"):
        train.train(settings(preset=pico, data=str(b), out_dir=str(out), max_iters=2))  # a vocabulary of 2048
    assert not out.exists()  # the run saved nothing: no empty folder left behind


def test_a_one_token_bin_is_refused_and_a_bin_of_one_context_is_read(tmp_path):
    """One token is no (input, target) pair: nothing to train on. A bin of exactly
    block_size tokens repeats to a full window like any short bin."""
    np.arange(5, 21, dtype=np.uint16).tofile(tmp_path / "train.bin")  # 16 tokens: one context
    np.array([3], dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text("{}")
    mixture = train.Mixture(str(tmp_path), 16, 2048, prepare_default=False, splits=("train",))
    x, y = mixture.batch("train", 0, 0, range(2))
    assert list(x[0]) == list(range(5, 21)) and list(y[0]) == list(range(6, 21)) + [5]
    with pytest.raises(UserError, match="val.bin is empty: nothing to validate"):
        train.Mixture(str(tmp_path), 16, 2048, prepare_default=False)


def test_datasets_that_are_not_token_bins_are_refused(tmp_path):
    """A zero weight, JSONL documents or a folder without meta.json (prepare.py never
    finished) would train on something else than asked: each is named."""
    a = make_dataset(tmp_path / "a")
    with pytest.raises(UserError, match="weights must be positive"):
        train.Mixture(f"{a}:1,{a}:0", 16, 2048, prepare_default=False)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "meta.json").write_text(json.dumps({"output": "jsonl"}))
    with pytest.raises(UserError, match="holds JSONL documents"):
        train.Mixture(str(tmp_path / "j"), 16, 2048, prepare_default=False)
    (a / "meta.json").unlink()
    with pytest.raises(UserError, match="no prepared data at"):
        train.Mixture(str(a), 16, 2048, prepare_default=False)


def test_data_specs_with_spaces_colons_or_a_dataset_twice_and_bins_cut_short(tmp_path):
    """Spaces around ":" stayed in the name; a folder whose path holds ":" could not be named
    without a weight; a dataset named twice weighed double (and validated twice); a bin cut
    short to an even size trained on zeros that were never in the corpus."""
    a, b = make_dataset(tmp_path / "a"), make_dataset(tmp_path / "x:y" / "b", seed=1)
    assert train.Mixture(f"{a} : 0.5, {b} : 0.5", 16, 2048, prepare_default=False).folders == [a, b]
    assert train.Mixture(str(b), 16, 2048, prepare_default=False).folders == [b]
    with pytest.raises(UserError, match=re.escape(f"names the dataset {a}/ twice")):
        train.Mixture(f"{a}:0.5,{a}/:0.5", 16, 2048, prepare_default=False)
    meta = json.loads((a / "meta.json").read_text())
    (a / "meta.json").write_text(json.dumps({**meta, "files": {"train.bin": (a / "train.bin").stat().st_size,
                                                               "val.bin": (a / "val.bin").stat().st_size}}))
    train.Mixture(str(a), 16, 2048, prepare_default=False)  # as prepare.py wrote it
    with open(a / "train.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(UserError, match=r"train.bin holds [\d,]+ bytes, not the [\d,]+ prepare.py wrote"):
        train.Mixture(str(a), 16, 2048, prepare_default=False)


def test_a_total_batch_that_is_not_a_multiple_is_refused(tmp_path, pico, capsys):
    """--total_batch_size=6 of micro-batches of 4 cannot be met: silently training on 4 is wrong.
    Refused before the checkpoint is read (it printed "resuming ..." first)."""
    data = make_dataset(tmp_path / "ds")
    train.train(settings(preset=pico, data=str(data), out_dir=str(tmp_path / "out"), max_iters=2))
    capsys.readouterr()
    with pytest.raises(UserError, match="--total_batch_size=6 is not a multiple of batch_size x processes = 4"):
        train.train(settings(preset=pico, data=str(data), out_dir=str(tmp_path / "out"), total_batch_size=6,
                             max_iters=4))
    assert "resuming" not in capsys.readouterr().out


def test_weights_from_scratch_depend_on_the_seed(tmp_path, pico):
    """--seed fixes the initial weights: runs (and every DDP process) start from the same model."""
    def weights(seed):
        return train.build_model(settings(preset=pico, seed=seed), tmp_path / "out", True)[0].state_dict()
    a, b, c = weights(3), weights(3), weights(4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_a_second_ctrl_c_stops_at_once(monkeypatch, capsys):
    """The first SIGTERM or Ctrl-C asks for a save; a second Ctrl-C (not a second SIGTERM) gives up waiting."""
    monkeypatch.setattr(train, "_stop_signal", None)
    train._on_signal(signal.SIGTERM, None)
    try:
        train._on_signal(signal.SIGTERM, None)
    except KeyboardInterrupt:
        pytest.fail("a second SIGTERM (a scheduler's reminder) must not abandon the save")
    assert train._stop_signal == signal.SIGTERM and "SIGTERM: saving a checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(train, "_stop_signal", None)
    train._on_signal(signal.SIGINT, None)
    assert train._stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        train._on_signal(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):  # torchrun passes a second Ctrl-C on as SIGTERM
        train._on_signal(signal.SIGTERM, None)
    monkeypatch.setattr(train, "_stop_signal", None)
    train._on_signal(signal.SIGTERM, None)  # a scheduler's SIGTERM, then Ctrl-C: stop now
    with pytest.raises(KeyboardInterrupt):
        train._on_signal(signal.SIGINT, None)


def test_gradient_clipping_bounds_the_update(tmp_path, pico):
    """A gradient clipped to a norm far below Adam's eps moves the weights ~1000x less than
    an unclipped one; --grad_clip=0 does not clip."""
    data = str(make_dataset(tmp_path / "ds"))
    torch.manual_seed(3)
    initial = GPT(train.PRESETS[pico]).state_dict()
    moved = {}
    for clip in (0.0, 1e-11):
        model = train.train(settings(preset=pico, data=data, out_dir=str(tmp_path / f"out{clip}"), max_iters=1,
                                     warmup_iters=0, weight_decay=0.0, grad_clip=clip, eval_interval=0))
        moved[clip] = (model.lm_head.weight - initial["lm_head.weight"]).abs().mean().item()
    assert moved[0.0] > 1e-4 and moved[1e-11] < moved[0.0] / 100, moved


def test_the_loss_that_became_nan_is_named_by_its_step(tmp_path, pico, monkeypatch):
    """Log lines count steps from 1; the error names the first bad step in that count, even
    when it is found only at the next log line."""
    forward, calls = GPT.forward, []

    def nan_at_third_step(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        calls.append(1)
        return logits, (loss * float("nan") if len(calls) == 3 else loss)

    monkeypatch.setattr(GPT, "forward", nan_at_third_step)
    cfg = settings(preset=pico, data=str(make_dataset(tmp_path / "ds")), out_dir=str(tmp_path / "out"),
                   max_iters=6, log_interval=100, eval_interval=0)
    with pytest.raises(UserError, match=r"the loss became inf or nan at step 3: training diverged \(lower "
                                        r"--learning_rate; no checkpoint was saved\)$"):  # none to resume from
        train.train(cfg)
    assert len(calls) == 6 and not (tmp_path / "out" / "ckpt.pt").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_log_line_throughput_and_mfu_count_training_time_only(tmp_path, pico, monkeypatch, capsys, processes):
    """On a clock where a step takes 1 s and a validation batch 100 s: 1000 ms/step, the
    tokens of all processes per s, MFU per process from the model's FLOPs per token;
    validation time is not training time. (2 processes: process 0 of 2 in a one-member group.)"""
    import torch.distributed as dist
    clock = [0.0]
    monkeypatch.setattr(train, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(train, "setup_processes", lambda name: (0, processes, torch.device("cpu")))

    def tick(split):
        clock[0] += 100.0 if split == "val" else 1.0

    data = str(make_dataset(tmp_path / "ds"))
    cfg = settings(preset=pico, data=data, out_dir=str(tmp_path / "out"), max_iters=4, log_interval=2,
                   eval_interval=1000, eval_iters=2, peak_tflops=1e-9)
    if processes > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = train.train(cfg, make_data=recording(data, then=tick))
    finally:
        if processes > 1:
            dist.destroy_process_group()
    tok_s = 64 * processes  # 4 sequences of 16 tokens per process and step
    mfu = 100 * model.flops_per_token() * tok_s / processes / 1e3
    lines = re.findall(r"step \d \| .*", capsys.readouterr().out)
    assert len(lines) == 2, lines
    for line in lines:
        assert f"| 1000 ms/step | {tok_s} tok/s | MFU {mfu:.1f}%" in line, line


def record_training_rng_states(monkeypatch) -> list:
    """The list to which every training forward from now on adds torch's random state at its start."""
    forward, states = GPT.forward, []

    def spy(self, *args, **kwargs):
        if self.training:
            states.append(torch.random.get_rng_state())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    return states


def test_dropout_noise_is_fresh_each_step_and_a_function_of_the_step(tmp_path, pico, monkeypatch):
    """The random state each training forward starts from differs from step to step (a
    repeated dropout mask is no regulariser) and depends on (seed, step) alone, so a resumed run
    replays it."""
    states = record_training_rng_states(monkeypatch)
    data = str(make_dataset(tmp_path / "ds"))
    cfg = dict(preset=pico, data=data, dropout=0.1, max_iters=3, eval_interval=0, checkpoint_interval=0)
    train.train(settings(**cfg, out_dir=str(tmp_path / "a")))
    first, states[:] = list(states), []
    torch.manual_seed(12345)  # whatever the state before the run
    train.train(settings(**cfg, out_dir=str(tmp_path / "b")))
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, states))
    assert not any(torch.equal(first[i], first[j]) for i in range(3) for j in range(i + 1, 3))


def test_dropout_noise_follows_the_micro_batch_not_the_process(tmp_path, pico, monkeypatch):
    """Process 1 of 2 (in a one-member group) starts its micro-steps from the random states
    one process has at the same micro-batches, the step's second and fourth: a run with
    dropout resumed on another number of processes goes on as it would have."""
    import torch.distributed as dist

    states = record_training_rng_states(monkeypatch)
    data = str(make_dataset(tmp_path / "ds"))
    cfg = dict(preset=pico, data=data, dropout=0.1, batch_size=2, total_batch_size=8, max_iters=2,
               eval_interval=0, checkpoint_interval=0)
    train.train(settings(**cfg, out_dir=str(tmp_path / "one")))
    alone, states[:] = list(states), []
    monkeypatch.setattr(train, "setup_processes", lambda name: (1, 2, torch.device("cpu")))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train.train(settings(**cfg, out_dir=str(tmp_path / "two")))
    finally:
        dist.destroy_process_group()
    assert len(alone) == 8 and len(states) == 4
    assert all(torch.equal(a, b) for a, b in zip(states, [alone[i] for i in (1, 3, 5, 7)]))


def test_validation_reads_each_dataset_s_val_split_for_eval_iters_batches(tmp_path, pico, capsys):
    """Each dataset gets its own val loss, the mean of eval_iters batches of its own val
    split, at step 0, every eval_interval steps and at the end; training reads train only."""
    a, b = make_dataset(tmp_path / "a", seed=1), make_dataset(tmp_path / "b", seed=2)
    spec = f"{a}:0.5,{b}:0.5"
    make_data = recording(spec)
    model = train.train(settings(preset=pico, data=spec, out_dir=str(tmp_path / "out"), max_iters=4,
                                 eval_interval=2, eval_iters=3), make_data=make_data)
    calls = make_data.data.calls
    assert all(only is None for split, _, _, only in calls if split == "train")
    val = [(k, rows, only) for split, k, rows, only in calls if split == "val"]
    # steps 0, 2 and 4: rows 0 to 11 of val "step" 0, in batches of 4
    assert val == [(0, range(4 * k, 4 * k + 4), i) for _ in range(3) for i in range(2) for k in range(3)]
    final = re.findall(r"step 4: val loss ([\d.]+) \(.*\), ([\d.]+) \(", capsys.readouterr().out)
    mixture = train.Mixture(spec, 16, 2048, prepare_default=False)
    model.eval()
    with torch.no_grad():
        expected = [np.mean([model(*map(torch.from_numpy, mixture.batch("val", 3, 0, range(4 * k, 4 * k + 4),
                                                                       only=i)))[1].item()
                             for k in range(3)]) for i in range(2)]
    assert [float(v) for v in final[0]] == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("mixed", [False, True])
def test_a_stopped_run_resumes_exactly_in_process(tmp_path, pico, capsys, mixed):
    """Stopping at --stop_iters and rerunning continues as one run would have: the same
    batches, dropout noise, optimizer moments and learning-rate step (fast, without processes);
    mixed: of two datasets by weight, in micro-steps, the same losses logged too."""
    data = str(make_dataset(tmp_path / "ds"))
    if mixed:
        data = f"{data}:0.7,{make_dataset(tmp_path / 'ds2', n_tokens=5000, seed=1)}:0.3"
    cfg = dict(preset=pico, data=data, dropout=0.1, max_iters=6, warmup_iters=2, eval_interval=0, log_interval=1,
               **(dict(batch_size=2, total_batch_size=6) if mixed else {}))
    straight = train.train(settings(**cfg, out_dir=str(tmp_path / "straight")))
    losses = re.findall(r"step \d+ \| loss \S+", capsys.readouterr().out)
    out = str(tmp_path / "out")
    for _ in range(2):  # the second run finds the work done
        train.train(settings(**cfg, out_dir=out, stop_iters=3))
    first_half = capsys.readouterr().out
    assert "already finished 3 steps" in first_half
    resumed = train.train(settings(**cfg, out_dir=out))
    second_half = capsys.readouterr().out
    assert f"resuming {Path(out) / 'ckpt.pt'} from step 3" in second_half
    assert re.findall(r"step \d+ \| loss \S+", first_half + second_half) == losses and len(losses) == 6
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_a_checkpoint_holds_what_resuming_needs(tmp_path, pico):
    """Weights, config, step, settings, origin, the best score and the optimizer at the
    schedule's rate for every group; --checkpoint_interval=0 writes none (but on SIGTERM)."""
    data = str(make_dataset(tmp_path / "ds"))
    cfg = settings(preset=pico, data=data, out_dir=str(tmp_path / "out"), max_iters=5, warmup_iters=2,
                   checkpoint_interval=3, eval_interval=0)
    train.train(cfg)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["origin"] == "scratch" and ckpt["settings"]["max_iters"] == 5
    assert {"model", "config", "optimizer", "scaler", "best"} <= ckpt.keys() and ckpt["config"]["n_layer"] == 1
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 2 and all(g["lr"] == pytest.approx(train.learning_rate(4, cfg)) for g in groups)
    assert len(ckpt["optimizer"]["state"]) == sum(len(g["params"]) for g in groups)
    train.train(settings(preset=pico, data=data, out_dir=str(tmp_path / "none"), max_iters=2,
                         checkpoint_interval=0, eval_interval=0))
    assert not (tmp_path / "none" / "ckpt.pt").exists()


def test_a_second_process_reads_its_own_batches_syncs_once_and_stays_silent(tmp_path, pico, monkeypatch, capsys):
    """Process 1 of 2 (played by one process in a one-member group): its micro-steps read
    the step's second and fourth micro-batches, gradients are all-reduced on the last
    micro-step only, and it neither logs nor writes checkpoints: those are process 0's."""
    import torch.distributed as dist
    data = str(make_dataset(tmp_path / "ds"))
    synced = []

    class SpyDDP(train.DDP):
        def forward(self, *args, **kwargs):
            synced.append(self.require_backward_grad_sync)
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(train, "DDP", SpyDDP)
    monkeypatch.setattr(train, "setup_processes", lambda name: (1, 2, torch.device("cpu")))
    make_data = recording(data)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train.train(settings(preset=pico, data=data, out_dir=str(tmp_path / "out"), batch_size=2,
                             total_batch_size=8, max_iters=3, log_interval=1, checkpoint_interval=1,
                             eval_interval=1, sample_tokens=20), make_data=make_data)
    finally:
        dist.destroy_process_group()
    assert synced == [False, True] * 3
    train_rows = [(step, rows) for split, step, rows, _ in make_data.data.calls if split == "train"]
    assert train_rows == [(s, rows) for s in range(3) for rows in (range(2, 4), range(6, 8))] + [(3, range(2, 4))]
    assert capsys.readouterr().out == "" and not (tmp_path / "out" / "ckpt.pt").exists()


def test_resuming_weights_without_training_state_or_that_do_not_fit_is_one_line(tmp_path, pico):
    """best.pt (weights, no optimizer) copied over ckpt.pt, and a checkpoint whose tensors
    do not fit its config, are named; nothing trains."""
    data = str(make_dataset(tmp_path / "ds"))
    cfg = settings(preset=pico, data=data, out_dir=str(tmp_path / "out"), max_iters=4, eval_interval=0)
    train.train(cfg)
    ckpt_path = tmp_path / "out" / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer", "scaler")}, ckpt_path)
    more = settings(preset=pico, data=data, out_dir=str(tmp_path / "out"), max_iters=8, eval_interval=0)
    with pytest.raises(UserError, match="without the state to resume.*--init_from=.*ckpt.pt and another --out_dir"):
        train.train(more)
    ckpt["model"]["lm_head.weight"] = ckpt["model"]["lm_head.weight"][:, :-1]
    torch.save(ckpt, ckpt_path)
    with pytest.raises(UserError, match="^cannot resume: .*weights do not fit .*lm_head.weight"):
        train.train(more)


def test_resuming_with_other_settings_or_training_anew_over_a_run_says_so(tmp_path, pico, capsys):
    data = str(make_dataset(tmp_path / "ds"))
    common = dict(preset=pico, data=data, out_dir=str(tmp_path / "out"), eval_interval=0)
    train.train(settings(**common, max_iters=2))
    capsys.readouterr()
    train.train(settings(**common, max_iters=4, learning_rate=0.5, log_interval=1))  # not logging: not noted
    err = capsys.readouterr().err
    assert "warning: resuming with other settings than the run had: --learning_rate=0.5 (was 0.003)" in err
    assert "log_interval" not in err and "max_iters" not in err
    train.train(settings(**common, max_iters=6, learning_rate=0.5))
    err = capsys.readouterr().err
    assert "resuming with other settings" not in err  # what the last run had
    # a finished run goes on with a larger --max_iters: its linear decay had ended at 0
    assert "warning: with --max_iters=6 (was 4) the learning rate goes from 0.00e+00 to 2.50e-01 at step 4" in err
    train.train(settings(**common, max_iters=2, init_from="scratch"))
    assert "training anew; the first checkpoint replaces the run in" in capsys.readouterr().err


def test_a_signal_after_the_last_step_skips_the_final_evaluation(tmp_path, pico, monkeypatch):
    """SIGTERM while the final validation runs stops it (the last checkpoint is written),
    instead of being announced and ignored until the evaluation ends."""
    data = str(make_dataset(tmp_path / "ds"))

    def then(split):  # SIGTERM at the first batch of the second validation: the one after the last step
        if [c[0] for c in make_data.data.calls].count("val") == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "_stop_signal", None)
    make_data = recording(data, then)
    with pytest.raises(KeyboardInterrupt):
        train.train(settings(preset=pico, data=data, out_dir=str(tmp_path / "out"), max_iters=3, eval_interval=10,
                             eval_iters=5, checkpoint_interval=3), make_data=make_data)
    assert [c[0] for c in make_data.data.calls].count("val") == 6
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 3


def test_the_validation_loss_is_a_mean_over_the_targets_that_count(tmp_path, pico, capsys):
    """A finetuning window can hold no completion token (a long prompt): its batch adds
    nothing to the validation loss, instead of a loss of 0 that pulls the mean down."""
    mixture = train.Mixture(str(make_dataset(tmp_path / "ds")), 16, 2048, prepare_default=False)

    class Masked:  # every odd validation batch, or (copies) the even batch before it
        names = mixture.names

        def __init__(self, copies: bool):
            self.copies = copies

        def batch(self, split, seed, k, rows, only=None):
            if split == "train":
                return mixture.batch(split, seed, k, rows, only=only)
            x, y = mixture.batch(split, seed, k - k % 2, rows, only=only)
            return (x, y) if k % 2 == 0 or self.copies else (x, np.full_like(y, -1))

        counted = mixture.counted  # training batches are the mixture's

    losses = []
    for copies in (False, True):
        train.train(settings(preset=pico, out_dir=str(tmp_path / str(copies)), max_iters=1, eval_interval=5,
                             eval_iters=4), make_data=lambda config: Masked(copies))
        losses.append(float(capsys.readouterr().out.split("step 0: val loss ")[1].split()[0]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-4) and losses[0] > 5


def test_a_second_run_in_the_same_out_dir_is_refused_while_the_first_trains(tmp_path, pico):
    """It would overwrite the first run's checkpoints with its own; once the first ends,
    the folder is free again."""
    data = str(make_dataset(tmp_path / "ds"))
    cfg = dict(preset=pico, data=data, out_dir=str(tmp_path / "out"), eval_interval=0)
    seen = []

    def then(split):  # the second run starts while the first is at its first step
        if not seen:
            seen.append(True)
            with pytest.raises(UserError, match=f"another run is training in {re.escape(str(tmp_path / 'out'))}"):
                train.train(settings(**cfg, max_iters=4, init_from="scratch"))

    train.train(settings(**cfg, max_iters=2), make_data=recording(data, then))
    assert seen and torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 2
    train.train(settings(**cfg, max_iters=3))  # resumes: the lock went with the first run
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 3


def test_a_checkpoint_saved_by_another_run_while_this_one_starts_is_not_overwritten(tmp_path, pico, monkeypatch):
    """The out_dir is locked after the checkpoint is read: a run stopping (saving phi-1's
    17 GB takes minutes) while a second one read the older checkpoint let the second go
    on from the older step once the first had gone, and overwrite the newer checkpoint."""
    data = str(make_dataset(tmp_path / "ds"))
    cfg = dict(preset=pico, data=data, out_dir=str(tmp_path / "out"), eval_interval=0)
    train.train(settings(**cfg, max_iters=2))
    newer = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    newer["step"] = 3
    build_model = train.build_model

    def read_as_another_run_saves(*args):
        built = build_model(*args)
        torch.save(newer, tmp_path / "out" / "ckpt.tmp")
        os.replace(tmp_path / "out" / "ckpt.tmp", tmp_path / "out" / "ckpt.pt")  # as save_checkpoint does
        return built
    monkeypatch.setattr(train, "build_model", read_as_another_run_saves)
    with pytest.raises(UserError, match=r"ckpt\.pt was saved by another run while this one started"):
        train.train(settings(**cfg, max_iters=5))
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 3


def test_a_run_shorter_than_the_log_interval_logs_its_last_step(tmp_path, pico, capsys):
    data = str(make_dataset(tmp_path / "ds"))
    train.train(settings(preset=pico, data=data, out_dir=str(tmp_path / "out"), max_iters=3, log_interval=10,
                         eval_interval=0))
    assert re.search(r"^step 3 \| loss \d+\.\d{4} \| lr .* tok/s$", capsys.readouterr().out, re.MULTILINE)


def test_every_counted_target_weighs_the_same_however_the_step_is_split(tmp_path):
    trained = []
    for batch_size in (2, 1):  # one micro-step of both rows, or one micro-step per row
        cfg = settings(out_dir=str(tmp_path / str(batch_size)), batch_size=batch_size, total_batch_size=2,
                       max_iters=1, warmup_iters=0, eval_interval=0, dropout=0, grad_clip=0, learning_rate=1e-3)
        model = train.train(cfg, make_data=lambda config: FixedRows(config.block_size))
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # AdamW's first step moves each weight by about lr * sign(gradient): a row weighed
    # otherwise flips signs, and weights, by 2e-3
    assert (trained[0] - trained[1]).abs().max() < 1e-5


def test_a_step_that_counts_no_target_changes_no_weight(tmp_path, capsys):
    cfg = settings(out_dir=str(tmp_path / "out"), batch_size=2, max_iters=1, warmup_iters=0, eval_interval=0,
                   log_interval=1, weight_decay=0.1)
    model = train.train(cfg, make_data=lambda config: FixedRows(config.block_size, 0, 0))
    torch.manual_seed(cfg.seed)
    initial = GPT(train.requested_config(cfg))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), initial.state_dict().values()))
    assert "step 1 | loss - (no target counted)" in capsys.readouterr().out


def test_a_signal_to_one_process_under_ddp_stops_both_a_step_later(tmp_path):
    """Processes under DDP agree to stop every step, one step late (no stall): a signal
    between log steps no longer waits for the next one, which may be minutes away (and
    torchrun kills its processes 30 s after passing a SIGTERM on)."""
    data = make_dataset(tmp_path / "ds")
    script = tmp_path / "ddp_signal.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import train
from config import parse_args, run

class SignalledOnRank1(train.Mixture):  # SIGTERM reaches process 1 alone, while step 2 runs
    def batch(self, split, seed, step, rows, only=None):
        if split == "train" and os.environ["RANK"] == "1" and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().batch(split, seed, step, rows, only=only)

cfg, _ = parse_args(train.DEFAULTS, argv=sys.argv[1:])
run(lambda: train.train(cfg, make_data=lambda c: SignalledOnRank1(cfg.data, c.block_size, c.vocab_size,
                                                                    prepare_default=False)))
""")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         f"--data={data}", "--preset=nano", "--batch_size=2", "--max_iters=12", "--warmup_iters=1",
         "--log_interval=1000", "--checkpoint_interval=1000", "--eval_interval=0", "--sample_tokens=0",
         f"--out_dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "stopped by SIGTERM" in result.stdout, result.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4  # signalled during step 3: all stop after step 4


def test_a_signal_during_a_score_under_ddp_saves_the_step_being_scored_and_the_resume_scores_it(tmp_path):
    """Under DDP the processes trained a step or two more and saved there, unscored: the
    resume never scored the interrupted step (finetune's best.pt could miss its best model)."""
    data = make_dataset(tmp_path / "ds")
    script = tmp_path / "ddp_score_signal.py"
    script.write_text(f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
import train
from config import parse_args, run

scored = []

def score(model):  # process 0's; SIGTERM while step 4 is scored
    scored.append(1)
    if len(scored) == 2 and os.environ.get("SIGNAL_IN_SCORE"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    return "fake", 0.0

cfg, _ = parse_args(train.DEFAULTS, argv=sys.argv[1:])
run(lambda: train.train(cfg, score=score))
""")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               f"--data={data}", "--preset=nano", "--batch_size=2", "--max_iters=6", "--warmup_iters=1",
               "--log_interval=1000", "--checkpoint_interval=1000", "--eval_interval=4", "--eval_iters=1",
               "--sample_tokens=0", f"--out_dir={out}"]
    stopped = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "SIGNAL_IN_SCORE": "1"})
    assert "stopped by SIGTERM" in stopped.stdout, stopped.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["score_due"]) == (4, True)  # was step 5, its score due no more
    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "step 4: fake 0.0000" in resumed.stdout, resumed.stdout


def test_a_resume_warns_of_another_batch_size_with_dropout_only_and_clears_a_half_written_save(tmp_path, capsys):
    """A step's rows do not depend on the processes or --batch_size, which only split
    them; dropout noise is drawn per micro-batch."""
    data = str(make_dataset(tmp_path / "ds"))
    for dropout in (0.0, 0.1):
        out = tmp_path / f"out{dropout}"
        train.train(settings(data=data, out_dir=str(out), max_iters=2, checkpoint_interval=1, batch_size=2,
                             dropout=dropout))
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["total_batch"] == 2
        ckpt["total_batch"] = 4  # as a run of 2 processes with --total_batch_size=0 saves it
        ckpt["settings"]["total_batch_size"] = 0
        torch.save(ckpt, out / "ckpt.pt")
        (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint, left by a kill")
        capsys.readouterr()
        train.train(settings(data=data, out_dir=str(out), max_iters=3, checkpoint_interval=1,
                             batch_size=4, total_batch_size=4, dropout=dropout, eval_iters=1))  # the same val rows
        err = capsys.readouterr().err
        # --total_batch_size=4 is the 4 sequences the run had
        assert err == ("warning: resuming with other settings than the run had: --batch_size=4 (was 2)\n"
                       if dropout else ""), err
        assert not (out / "ckpt.pt.tmp").exists()


def test_a_resume_trains_with_its_own_weight_decay_and_betas(tmp_path, capsys):
    """load_state_dict brought back the checkpoint's, while the resume warned of the new ones."""
    data, out = str(make_dataset(tmp_path / "ds")), tmp_path / "out"
    train.train(settings(data=data, out_dir=str(out), max_iters=2, checkpoint_interval=1))
    train.train(settings(data=data, out_dir=str(out), max_iters=3, checkpoint_interval=1, weight_decay=0.5,
                         beta1=0.8, beta2=0.99))
    assert "--weight_decay=0.5 (was 0.1)" in capsys.readouterr().err
    groups = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.5, (0.8, 0.99)), (0.0, (0.8, 0.99))]


def test_the_time_a_save_takes_is_not_counted_as_training(tmp_path, monkeypatch, capsys):
    clock, save = [0.0], train.save_checkpoint

    def slow_save(*args, **kwargs):  # a phi-1 checkpoint takes a while to write
        clock[0] += 1000.0
        save(*args, **kwargs)

    def tick():  # 1 ms a call: every measured interval is short, but for a save in it
        clock[0] += 0.001
        return clock[0]

    monkeypatch.setattr(train, "save_checkpoint", slow_save)
    monkeypatch.setattr(train.time, "time", tick)
    train.train(settings(data=str(make_dataset(tmp_path / "ds")), out_dir=str(tmp_path / "out"), max_iters=4,
                         log_interval=1, checkpoint_interval=2))
    ms = [int(m) for m in re.findall(r"\| (\d+) ms/step", capsys.readouterr().out)]
    assert len(ms) == 4 and max(ms) < 1000, ms  # the step after a save took 1000 s more


def test_the_validation_rows_do_not_depend_on_how_batches_split_them(tmp_path, capsys):
    """--eval_iters x --batch_size rows, numbered on: 2 x 4 and 4 x 2 are the same rows, and a
    resume that measures on other rows says so."""
    data = str(make_dataset(tmp_path / "ds"))
    for eval_iters, batch_size in ((2, 4), (4, 2)):
        train.train(settings(data=data, out_dir=str(tmp_path / f"out{batch_size}"), max_iters=2, eval_interval=2,
                             eval_iters=eval_iters, batch_size=batch_size, total_batch_size=4))
    losses = re.findall(r"step 0: val loss ([\d.]+)", capsys.readouterr().out)
    assert len(losses) == 2 and losses[0] == losses[1], losses
    train.train(settings(data=data, out_dir=str(tmp_path / "out4"), max_iters=3, eval_interval=2, eval_iters=2,
                         batch_size=2, total_batch_size=4))
    assert ("note: the validation loss is measured on 4 rows (--eval_iters x --batch_size), the run's was on 8, so "
            "its curve may step: give --eval_iters=4 to keep them") in capsys.readouterr().err


def test_weights_that_sum_past_the_largest_float_still_mix(tmp_path):
    a, b = make_dataset(tmp_path / "a"), make_dataset(tmp_path / "b", seed=1)
    mixture = train.Mixture(f"{a}:1e308,{b}:1e308", 16, 51200, prepare_default=False)
    assert mixture.weights.tolist() == [0.5, 0.5]
    assert mixture.batch("train", 0, 0, range(4))[0].shape == (4, 16)


def test_the_best_score_keeps_the_later_of_a_tie_and_is_forgotten_when_another_score_gives_it(tmp_path, capsys):
    """A plateau kept the earliest model (finetuning: the base model, scored at step 0), and a
    resume scoring other problems compared its scores with the old ones."""
    data, out = str(make_dataset(tmp_path / "ds")), tmp_path / "out"
    common = dict(data=data, out_dir=str(out), eval_interval=2, checkpoint_interval=2)
    train.train(settings(max_iters=4, **common), score=lambda model: ("probe", 0.0))
    best = torch.load(out / "best.pt", weights_only=True)
    assert (best["step"], best["best"], best["best_by"]) == (4, 0.0, "probe")
    capsys.readouterr()
    train.train(settings(max_iters=6, **common), score=lambda model: ("other probe", -1.0))
    assert "best.pt scored 0.0000 by probe; the next score, by other probe, replaces it" in capsys.readouterr().err
    best = torch.load(out / "best.pt", weights_only=True)
    assert (best["step"], best["best"], best["best_by"]) == (6, -1.0, "other probe")


def test_a_run_stopped_while_scoring_its_last_step_scores_it_when_rerun(tmp_path, capsys):
    """The last checkpoint is written before the last score: a kill during that score left a
    finished run whose rerun said "already finished" and never scored it, and whose
    checkpoint kept the best score from before it."""
    data, out = str(make_dataset(tmp_path / "ds")), tmp_path / "out"
    cfg = settings(data=data, out_dir=str(out), max_iters=4, eval_interval=2, checkpoint_interval=2)
    scored = []

    def score(model):
        scored.append(model.lm_head.weight.sum().item())
        if len(scored) == 3:  # steps 0, 2, then the last: killed while scoring it
            raise KeyboardInterrupt
        return "probe", float(len(scored))

    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, score=score)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["best"], ckpt["score_due"]) == (4, 2.0, True)
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 2
    capsys.readouterr()
    train.train(cfg, score=score)
    assert "holds step 4, but its run stopped before it scored that step: scoring it now" in capsys.readouterr().out
    assert len(scored) == 4 and scored[3] == scored[2]  # the same model as the interrupted score's
    best = torch.load(out / "best.pt", weights_only=True)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (best["step"], best["best"]) == (4, 4.0) and (ckpt["best"], ckpt["score_due"]) == (4.0, False)
    train.train(cfg, score=score)
    assert len(scored) == 4 and "already finished 4 steps" in capsys.readouterr().out


def test_a_phase_stopped_while_scoring_its_last_step_scores_it_when_the_run_goes_on(tmp_path, capsys):
    """--stop_iters=3 with --eval_interval=2: the next phase starts at step 3, which is no
    validation step, so a score interrupted there was never taken."""
    data, out = str(make_dataset(tmp_path / "ds")), tmp_path / "out"
    common = dict(data=data, out_dir=str(out), max_iters=6, eval_interval=2, checkpoint_interval=2)
    scored = []

    def score(model):
        scored.append(model.lm_head.weight.sum().item())
        if len(scored) == 3:  # steps 0, 2, then the phase's last, 3: killed while scoring it
            raise KeyboardInterrupt
        return "probe", float(len(scored))

    with pytest.raises(KeyboardInterrupt):
        train.train(settings(**common, stop_iters=3), score=score)
    capsys.readouterr()
    train.train(settings(**common), score=score)
    assert "holds step 3, but its run stopped before it scored that step: scoring it now" in capsys.readouterr().out
    assert len(scored) == 6 and scored[3] == scored[2]  # step 3 (the same model), then 4 and 6
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 6


def test_a_checkpoint_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """A rename written back before the data it names leaves, after a power loss, an empty
    checkpoint where the last good one was."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(train.os, "fsync", fsync)
    monkeypatch.setattr(train.os, "replace", replace)
    folder = tmp_path.resolve()
    train.save_checkpoint(folder / "ckpt.pt", GPT(PRESETS["nano"]), 1, settings())
    assert events == [("fsync", str(folder / "ckpt.pt.tmp")), ("replace", str(folder / "ckpt.pt.tmp"),
                                                                str(folder / "ckpt.pt")), ("fsync", str(folder))]


def test_a_resume_notices_data_prepared_again_under_the_same_name(tmp_path, capsys):
    data, out = make_dataset(tmp_path / "ds"), tmp_path / "out"
    train.train(settings(data=str(data), out_dir=str(out), max_iters=2, checkpoint_interval=1))
    capsys.readouterr()
    train.train(settings(data=str(data), out_dir=str(out), max_iters=3, checkpoint_interval=1))
    assert "warning" not in capsys.readouterr().err
    make_dataset(data, n_tokens=30_000, seed=1)  # the same folder, other tokens
    train.train(settings(data=str(data), out_dir=str(out), max_iters=4, checkpoint_interval=1))
    err = capsys.readouterr().err
    assert re.search(rf"warning: --data={re.escape(str(data))} holds other data than the run had \(prepared "
                     r"again\?\): [\d,]+ train tokens in ds \(was [\d,]+ train tokens in ds\)", err), err


def test_a_resume_names_a_folder_with_or_without_its_trailing_slash_the_same(tmp_path, capsys):
    data, out = make_dataset(tmp_path / "ds"), tmp_path / "out"
    train.train(settings(data=str(data), out_dir=str(out), max_iters=2, checkpoint_interval=1))
    capsys.readouterr()
    train.train(settings(data=f"{data}/", out_dir=str(out), max_iters=3, checkpoint_interval=1))
    assert "warning" not in capsys.readouterr().err
    train.train(settings(data=f"{make_dataset(tmp_path / 'other')}/", out_dir=str(out), max_iters=4))
    assert "--data=" in capsys.readouterr().err  # another folder still warns
