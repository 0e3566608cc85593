"""finetune.py: packing and the loss mask, training through train.py, resume, DDP, bad input."""

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
import tokenizer
from model import GPT, PRESETS
from test_train import BY_RANK

ROOT = Path(__file__).resolve().parent.parent


def exercises(n: int = 60) -> list[tuple[str, str]]:
    """Small exercises whose bodies follow from their prompts: something to learn."""
    out = []
    for i in range(n):
        a = i % 7
        out.append((f'def add_{i}(x):\n    """Return x plus {a}."""\n', f"    return x + {a}\n"))
    return out


def write_exercises(path: Path, items, extra_lines=()) -> Path:
    lines = [json.dumps({"id": f"ex-{i}", "prompt": p, "completion": c}) for i, (p, c) in enumerate(items)]
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random nano model saved as train.py saves checkpoints."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "ckpt.pt"
    config = PRESETS["nano"]
    torch.save({"model": GPT(config).state_dict(), "config": dataclasses.asdict(config), "step": 0}, path)
    return path


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_exercises_are_packed_with_eot_and_only_completions_count(monkeypatch):
    items = exercises(3)
    data = finetune.Exercises(items, block_size=16, loss_on="completion", val_fraction=0.0, name="ex")
    monkeypatch.setattr(finetune, "ENCODE_CHUNK", 2)  # tokenized in chunks: the same streams
    chunked = finetune.Exercises(items, block_size=16, loss_on="completion", val_fraction=0.0, name="ex")
    assert all(np.array_equal(a, b) for split in ("train", "val")
               for a, b in zip(data.splits[split], chunked.splits[split]))
    digests = [hashlib.sha256((p + c).encode()).digest() for p, c in items]
    in_val = digests.index(min(digests))  # a set with no val exercise gives val its most val-like one
    stream, stream_mask = [], []
    for i, (prompt, body) in enumerate(items):
        if i != in_val:
            p, b = tokenizer.encode(prompt), tokenizer.encode(body)
            stream += p + b + [tokenizer.EOT]
            stream_mask += [False] * len(p) + [True] * (len(b) + 1)
    tokens, mask = data.splits["train"]
    assert tokens[:len(stream)].tolist() == stream and mask[:len(stream)].tolist() == stream_mask
    assert len(tokens) >= 17  # a stream shorter than a window is repeated to fill one
    assert finetune.Exercises(items, 16, "all", 0.0, "ex").splits["train"][1].all()


def test_read_exercises_skips_and_counts_each_malformed_line_but_not_blank_ones(tmp_path):
    path = write_exercises(tmp_path / "ex.jsonl", exercises(2), extra_lines=[
        "", "   ",  # blank: neither an exercise nor malformed
        "not json", "[1, 2]", "7", '{"prompt": 1, "completion": "    return 1\\n"}',
        '{"prompt": "def f():\\n", "completion": " \\n "}', '{"completion": "    pass\\n"}',
        '{"prompt": "def g():\\n", "completion": "    return \\"\\ud800\\"\\n"}',  # valid JSON, no UTF-8
        "[" * 100_000 + "]" * 100_000])  # nested deeper than Python parses: was a RecursionError traceback
    items, malformed, failing, unchecked = finetune.read_exercises(path)
    assert items == exercises(2)
    assert (malformed, failing, unchecked) == (list(range(5, 13)), 0, 2)  # numbered from 1, blank lines too


def test_a_utf16_exercises_file_gives_no_garbled_exercises(tmp_path):
    """json.loads of bytes takes UTF-16: after the first line, each line cut at a \\n byte read
    as UTF-16-BE, ASCII right and every other character garbled ("代码" as other characters)."""
    path = tmp_path / "ex.jsonl"
    rows = [{"prompt": f'def f{i}():\n    """代码 {i}"""\n', "completion": f"    return {i}\n"} for i in range(3)]
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-16"))
    items, malformed, _, _ = finetune.read_exercises(path)
    assert items == [] and malformed == [1, 2, 3, 4]  # 4: the last newline's second byte


def test_drop_failing_leaves_out_the_exercises_whose_examples_did_not_pass(tmp_path):
    verdicts = ["passed", "failed: AssertionError", "timed out", "crashed: killed by SIGKILL", "none", "unchecked"]
    path = tmp_path / "ex.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c, "examples": v}) + "\n"
                            for (p, c), v in zip(exercises(6), verdicts)))
    assert finetune.read_exercises(path) == (exercises(6), [], 0, 1)  # the paper's way: all of them
    kept = [e for e, v in zip(exercises(6), verdicts) if v in ("passed", "none", "unchecked")]
    assert finetune.read_exercises(path, drop_failing=True) == (kept, [], 3, 1)  # unchecked: nothing says it fails


def test_val_batches_come_from_the_val_exercises_only():
    items = exercises(12)
    data = finetune.Exercises(items, block_size=8, loss_on="completion", val_fraction=0.3, name="ex")
    val_tokens = data.splits["val"][0]
    windows = {tuple(val_tokens[s:s + 8]) for s in range(len(val_tokens) - 8)}
    x, _ = data.batch("val", 0, 0, range(16))
    assert all(tuple(row) in windows for row in x)
    assert len(data.splits["train"][0]) != len(val_tokens)  # two streams to tell apart


def test_every_copy_of_the_exercise_that_a_tiny_set_holds_out_is_held_out():
    """Where no exercise's hash falls in val, the most val-like one goes there; a second copy
    of it stayed in train, so the model was validated on an exercise it trained on."""
    items = exercises(10)
    first = min(items, key=lambda e: hashlib.sha256((e[0] + e[1]).encode()).digest())
    data = finetune.Exercises(items + [first], block_size=8, loss_on="completion", val_fraction=0.0, name="ex")
    train, val = (tokenizer.decode(data.splits[split][0].tolist()) for split in ("train", "val"))
    assert first[1] in val and first[1] not in train and val.count(first[1]) == 2
    copies = finetune.Exercises([first] * 3, block_size=8, loss_on="completion", val_fraction=0.0, name="ex")
    assert [tokenizer.decode(copies.splits[s][0].tolist()).count(first[1]) for s in ("train", "val")] == [2, 1]


def test_a_row_depends_on_seed_step_and_its_place_alone():
    """Row i of a step is the same in any batch that holds it: processes and micro-steps
    may split a step as they like."""
    data = finetune.Exercises(exercises(20), block_size=8, loss_on="completion", val_fraction=0.0, name="ex")
    first = data.batch("train", 1, 0, range(8))
    assert all(np.array_equal(a, b) for a, b in zip(first, data.batch("train", 1, 0, range(8))))
    halves = [data.batch("train", 1, 0, rows) for rows in (range(4), range(4, 8))]
    assert all(np.array_equal(a, np.concatenate(b)) for a, b in zip(first, zip(*halves)))
    for seed, step, rows in [(2, 0, range(8)), (1, 1, range(8)), (1, 0, range(1, 9))]:
        assert not np.array_equal(first[0], data.batch("train", seed, step, rows)[0]), (seed, step, rows)


def test_an_exercise_is_too_long_only_past_a_whole_window():
    """A window holds block_size inputs and one more target: an exercise of block_size + 1
    tokens (its <|endoftext|> too) is learned whole, and was counted as too long."""
    for words, too_long in ((6, 0), (7, 1)):  # prompt, completion and <|endoftext|>: 9 and 10 tokens
        data = finetune.Exercises([(" x" * words, " y y"), ("a", " b")], block_size=8, loss_on="completion",
                                  val_fraction=0.0, name="ex")
        assert data.too_long == too_long, words


def test_a_stream_shorter_than_a_window_repeats_with_its_mask():
    items = exercises(2)
    data = finetune.Exercises(items, block_size=200, loss_on="completion", val_fraction=0.0, name="ex")
    tokens, mask = data.splits["train"]
    once = len(tokenizer.encode(items[0][0]) + tokenizer.encode(items[0][1])) + 1  # one exercise in train
    assert once < 100 and len(tokens) == len(mask) >= 201
    assert np.array_equal(tokens, np.tile(tokens[:once], len(tokens) // once))
    assert np.array_equal(mask, np.tile(mask[:once], len(mask) // once))
    x, y = data.batch("train", 0, 0, range(4))
    assert x.shape == y.shape == (4, 200) and (y != -1).any() and (y == -1).any()


def test_a_stream_exactly_one_window_long_gives_that_window():
    items = exercises(3)
    length = len(finetune.Exercises(items, 8, "completion", 0.0, "ex").splits["train"][0])
    data = finetune.Exercises(items, block_size=length - 1, loss_on="completion", val_fraction=0.0, name="ex")
    tokens, _ = data.splits["train"]
    x, y = data.batch("train", 0, 0, range(2))
    assert (x == tokens[:-1]).all()  # the last start a window can have is drawn too


def test_no_exercise_left_for_train_is_a_user_error():
    from config import UserError
    with pytest.raises(UserError, match="no exercises left for train"):
        finetune.Exercises(exercises(3), block_size=8, loss_on="completion", val_fraction=0.999999, name="ex")


def test_without_validation_every_exercise_trains():
    """--eval_interval=0 holds no exercise out (with it, even one exercise of two goes to val)."""
    from config import UserError
    items = exercises(2)
    data = finetune.Exercises(items, block_size=8, loss_on="completion", val_fraction=0.0, name="ex", validate=False)
    assert list(data.splits) == ["train"]
    both = sum(len(tokenizer.encode(p) + tokenizer.encode(c)) + 1 for p, c in items)
    assert len(data.splits["train"][0]) == both
    assert len(finetune.Exercises(items, 8, "completion", 0.0, "ex").splits["train"][0]) < both
    with pytest.raises(UserError, match=r"have 1; validation holds one out: give at least 2"):
        finetune.Exercises(items[:1], block_size=8, loss_on="completion", val_fraction=0.0, name="ex")
    assert finetune.Exercises(items[:1], 8, "completion", 0.0, "ex", validate=False).splits["train"][0].size


def test_finetune_passes_its_settings_to_the_exercises_it_trains_on(tmp_path, monkeypatch):
    from config import parse_settings
    path = write_exercises(tmp_path / "ex.jsonl", exercises(30))
    seen = {}

    def fake_train(cfg, make_data, score):  # train.py's loop, less the model: what finetune hands it
        seen.update(cfg=cfg, data=make_data(dataclasses.replace(PRESETS["nano"], block_size=512)), score=score)
    monkeypatch.setattr(finetune.train, "train", fake_train)
    cfg = parse_settings(finetune.DEFAULTS, argv=[f"--exercises={path}", "--base=some/base.pt", "--loss_on=all",
                                                  "--val_fraction=0.5", "--humaneval_max_tokens=8",
                                                  "--humaneval_problems=3", "--eval_interval=5"])
    finetune.finetune(cfg)
    data = seen["data"]
    assert seen["cfg"].init_from == "some/base.pt" and data.block_size == 512
    assert data.splits["train"][1].all()  # --loss_on=all
    expected = finetune.Exercises(exercises(30), 512, "all", 0.5, "ex")
    assert np.array_equal(data.splits["val"][0], expected.splits["val"][0])  # --val_fraction
    assert seen["score"] is not None
    cfg = parse_settings(finetune.DEFAULTS, argv=[f"--exercises={path}", "--val_fraction=0.5", "--eval_interval=0"])
    finetune.finetune(cfg)
    assert list(seen["data"].splits) == ["train"]  # no validation: nothing held out


def test_targets_follow_the_mask_exactly():
    items = exercises(5)
    data = finetune.Exercises(items, block_size=24, loss_on="completion", val_fraction=0.0, name="ex")
    tokens, mask = data.splits["train"]
    x, y = data.batch("train", 3, 1, range(16))
    for row_x, row_y in zip(x, y):
        start = next(s for s in range(len(tokens) - 24) if np.array_equal(tokens[s:s + 24], row_x))
        nxt = tokens[start + 1:start + 25]
        assert np.array_equal(row_y, np.where(mask[start + 1:start + 25], nxt, -1))


def test_counted_is_how_many_targets_the_batch_counts():
    data = finetune.Exercises(exercises(9), block_size=24, loss_on="completion", val_fraction=0.0, name="ex")
    counts = []
    for step, rows in [(0, range(6)), (5, range(12, 18)), (7, range(3, 9))]:
        _, y = data.batch("train", 11, step, rows)
        counts.append(data.counted(11, step, rows))
        assert counts[-1] == (y != -1).sum()
    assert 0 < min(counts) < 6 * 24  # prompts masked, completions counted


def test_counted_holds_for_exercises_of_many_lengths():
    """With exercises all one window long, the mask repeated every window: a count shifted by a
    token gave the same total."""
    varied = [(f'def f_{i}(x):\n    """{"Word " * (i % 5)}"""\n', f"    return x{' + 1' * (i % 3)}\n")
              for i in range(9)]
    data = finetune.Exercises(varied, block_size=24, loss_on="completion", val_fraction=0.0, name="ex")
    for step in range(6):
        _, y = data.batch("train", 11, step, range(6))
        assert data.counted(11, step, range(6)) == (y != -1).sum()


def test_a_stream_exactly_one_window_long_gives_batches():
    stream = sum(len(finetune.tokenizer.encode(p + c)) + 1 for p, c in exercises(2))  # each with its EOT
    data = finetune.Exercises(exercises(2), block_size=stream, loss_on="completion", val_fraction=0.0, name="ex",
                              validate=False)
    x, y = data.batch("train", 0, 0, range(2))
    assert x.shape == y.shape == (2, stream)


def test_the_same_text_split_elsewhere_is_other_exercises(tmp_path, monkeypatch):
    """A resume compares the exercises' content: moving the prompt/completion boundary changes
    what the loss counts."""
    from config import parse_settings
    seen = []
    monkeypatch.setattr(finetune.train, "train", lambda cfg, make_data, score: seen.append(cfg.exercises_content))
    items = exercises(4)
    moved = [(p + c[:4], c[4:]) for p, c in items]  # the body's indent now ends the prompt
    for each in (items, moved):
        path = write_exercises(tmp_path / "ex.jsonl", each)
        finetune.finetune(parse_settings(finetune.DEFAULTS, argv=[f"--exercises={path}", "--eval_interval=0"]))
    assert len(seen) == 2 and seen[0] != seen[1]


def test_exercises_longer_than_the_context_are_named_with_what_is_counted(tmp_path, monkeypatch, capsys):
    from config import parse_settings
    long_one = ("def long(x):\n    \"\"\"" + "word " * 200 + "\"\"\"\n", "    return x\n")
    path = write_exercises(tmp_path / "ex.jsonl", exercises(20) + [long_one])
    monkeypatch.setattr(finetune.train, "train", lambda cfg, make_data, score: make_data(
        dataclasses.replace(PRESETS["nano"], block_size=64)))
    finetune.finetune(parse_settings(finetune.DEFAULTS, argv=[f"--exercises={path}", "--eval_interval=0"]))
    out, err = capsys.readouterr()
    assert "warning: 1 exercises are longer than the context (64 tokens)" in err
    assert "of them counted by the loss (--loss_on=completion)" in out
    assert "repeat one before them" not in err
    write_exercises(path, exercises(20) + exercises(3))  # two files joined: their common exercises weigh twice
    finetune.finetune(parse_settings(finetune.DEFAULTS, argv=[f"--exercises={path}", "--eval_interval=0"]))
    assert "note: 3 exercises of" in capsys.readouterr().err


def test_completion_only_loss_sends_no_gradient_through_prompt_positions(base):
    model = GPT.from_checkpoint(base)
    data = finetune.Exercises(exercises(8), block_size=64, loss_on="completion", val_fraction=0.0, name="ex")
    x, y = map(torch.from_numpy, data.batch("train", 0, 0, range(4)))
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    per_position = logits.grad.abs().sum(-1)
    assert (per_position[y == -1] == 0).all()  # a prompt target can change nothing
    assert (per_position[y != -1] > 0).all()


def test_finetune_trains_keeps_the_best_and_resumes_exactly(tmp_path, base):
    data = write_exercises(tmp_path / "ex.jsonl", exercises(), extra_lines=["not json", '{"prompt": 1}'])
    args = [f"--base={base}", f"--exercises={data}", "--batch_size=4", "--total_batch_size=4", "--max_iters=16",
            "--warmup_iters=2", "--learning_rate=3e-3", "--checkpoint_interval=4", "--log_interval=4",
            "--eval_interval=8", "--eval_iters=2", "--sample_tokens=0", "--dropout=0.1",
            "--humaneval_problems=2", "--humaneval_max_tokens=8", "--val_fraction=0.1"]
    straight = cli(*args, f"--out_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    assert ": skipped 2 malformed lines (lines 61 and 62): each needs a string prompt" in straight.stdout
    assert "HumanEval pass@1 (2 problems, 8 tokens at most)" in straight.stdout and (tmp_path / "straight" / "best.pt").exists()
    losses = [float(line.split("val loss ")[1].split()[0]) for line in straight.stdout.splitlines()
              if "val loss" in line]
    assert losses[-1] < losses[0] - 1.0, losses

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "finetune.py"), *args, f"--out_dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("saved"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=120)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] < 16
    resumed = cli(*args, f"--out_dir={out}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    final = torch.load(out / "ckpt.pt", weights_only=True)
    expected = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert final["step"] == 16
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name


def test_a_resume_on_rewritten_exercises_warns_naming_finetunes_own_settings(tmp_path, base):
    """Also: a base moved since the run started does not stop its resume (it is not read), and
    a resume that turns validation on, which holds exercises out of training, says so."""
    data = write_exercises(tmp_path / "ex.jsonl", exercises(20))
    moved = tmp_path / "base.pt"
    moved.write_bytes(base.read_bytes())
    args = [f"--base={os.path.relpath(moved, ROOT)}",  # relative, as a user types it
            f"--exercises={data}", "--batch_size=2", "--total_batch_size=2", "--max_iters=2", "--warmup_iters=0",
            "--checkpoint_interval=1", "--sample_tokens=0", f"--out_dir={tmp_path / 'out'}"]
    assert cli(*args, "--eval_interval=0", "--stop_iters=1").returncode == 0
    # the same file named another way is no change (its contents are compared)
    renamed = [f"--exercises={os.path.relpath(data, ROOT)}" if a.startswith("--exercises=") else a for a in args]
    same = cli(*renamed, "--eval_interval=0", "--stop_iters=1")
    assert same.returncode == 0 and "other settings" not in same.stderr, same.stderr
    moved.rename(tmp_path / "renamed.pt")
    write_exercises(data, exercises(30))  # the same file, other exercises
    resumed = cli(*args, "--eval_interval=0")
    assert resumed.returncode == 0, resumed.stderr
    assert "exercises content: 30 exercises, sha256 " in resumed.stderr and "(was 20 exercises" in resumed.stderr
    assert "--data=" not in resumed.stderr  # not a finetune.py setting
    validated = cli(*args, "--max_iters=3", "--eval_interval=2", "--eval_iters=1")
    assert validated.returncode == 0, validated.stderr
    assert re.search(r"exercises content: 30 exercises, sha256 \w+ \(was 30 exercises, sha256 \w+, none held out "
                     r"for validation\)", validated.stderr), validated.stderr


def test_a_run_that_ended_on_a_scored_step_does_not_score_it_again_going_on(tmp_path, base):
    data = write_exercises(tmp_path / "ex.jsonl", exercises())
    args = [f"--base={base}", f"--exercises={data}", "--batch_size=2", "--total_batch_size=2", "--max_iters=4",
            "--warmup_iters=0", "--eval_interval=2", "--eval_iters=1", "--checkpoint_interval=2", "--sample_tokens=0",
            "--humaneval_problems=1", "--humaneval_max_tokens=8", f"--out_dir={tmp_path / 'out'}"]
    first = cli(*args, "--stop_iters=2")
    assert first.returncode == 0, first.stderr
    assert "step 2: HumanEval pass@1" in first.stdout and "saved" in first.stdout
    going_on = cli(*args)
    assert going_on.returncode == 0, going_on.stderr
    scored = re.findall(r"step (\d+): HumanEval", going_on.stdout)
    assert scored == ["4"], going_on.stdout  # step 2 was scored (and validated) twice, at 164 problems a while


def test_torchrun_ddp_finetuning_keeps_replicas_identical(tmp_path, base):
    data = write_exercises(tmp_path / "ex.jsonl", exercises())
    script = tmp_path / "ddp_finetune.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import finetune
from config import parse_args
cfg, _ = parse_args(finetune.DEFAULTS, argv=sys.argv[1:])
model = finetune.finetune(cfg)
os.makedirs(cfg.out_dir, exist_ok=True)  # rank 0 may not have written its checkpoint yet
torch.save(model.state_dict(), os.path.join(cfg.out_dir, f"rank{{os.environ['RANK']}}.pt"))
""")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         f"--base={base}", f"--exercises={data}", "--batch_size=2", "--total_batch_size=8", "--max_iters=4",
         "--warmup_iters=1", "--log_interval=2", "--eval_interval=0", "--sample_tokens=0", f"--out_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    initial = torch.load(base, weights_only=True)["model"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert not torch.equal(rank0["lm_head.weight"], initial["lm_head.weight"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "finetune.py"), f"--base={base}", f"--exercises={empty}",
                             f"--out_dir={tmp_path / 'out2'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert result.returncode != 0 and ours == [f"error: no exercises in {empty}"], result.stderr[-3000:]  # was twice
    # each node reads --exercises from its own disk: one whose copy differed trained on it without a word
    write_exercises(tmp_path / "ex0.jsonl", exercises())
    write_exercises(tmp_path / "ex1.jsonl", exercises(50))
    (tmp_path / "by_rank.py").write_text(BY_RANK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "by_rank.py", str(ROOT / "finetune.py"), f"--base={base}", "--exercises=exRANK.jsonl",
                             "--max_iters=2", "--eval_interval=0", "--sample_tokens=0", f"--out_dir={tmp_path / 'out3'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert result.returncode != 0 and len(ours) == 1, result.stderr[-3000:]
    assert re.fullmatch(r"error: processes read different exercises \(process 0: 60 exercises, sha256 \w+, none held out for "
                        r"validation\): "
                        r"--exercises must hold the same file on every node", ours[0])


def test_bad_input_gives_one_clear_line(tmp_path, base):
    data = write_exercises(tmp_path / "ex.jsonl", exercises(10))
    foreign = tmp_path / "foreign.pt"  # a checkpoint whose weights belong to another architecture
    torch.save({"model": {"transformer.wte.weight": torch.zeros(10, 4)},
                "config": dataclasses.asdict(PRESETS["nano"])}, foreign)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"prompt": "x"}\nnot json\n')
    cases = [([f"--base={foreign}", f"--exercises={data}"], "does not hold a phi-1 model"),
             (["--base=scratch", f"--exercises={data}"], "--base must name the weights to finetune"),
             ([f"--base={base}", f"--exercises={only_bad}"],  # it said no more: why is the user's to guess
              f"no exercises in {only_bad}; skipped 2 malformed lines (lines 1 and 2): each needs a string prompt"),
             ([f"--base={base}", f"--exercises={tmp_path / 'missing.jsonl'}"], "cannot read"),
             ([f"--base={base}", f"--exercises={data}", "--loss_on=some"], "--loss_on"),
             ([f"--base={base}", f"--exercises={data}", "--humaneval_problems=1"],  # nano: a 64-token context
              "--humaneval_max_tokens=256 leaves no room for a prompt")]
    for args, expected in cases:
        result = cli(*args, f"--out_dir={tmp_path / 'out'}", "--max_iters=2")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, result.stderr)
        assert "val loss" not in result.stdout and not (tmp_path / "out" / "ckpt.pt").exists()  # before any work


@pytest.mark.parametrize("setting, message", [
    ("--val_fraction=1.5", "--val_fraction must be in"), ("--val_fraction=-1", "--val_fraction must be in"),
    ("--humaneval_problems=-3", "--humaneval_problems must be 0 to 164"),
    ("--humaneval_problems=500", "--humaneval_problems must be 0 to 164"),
    ("--humaneval_max_tokens=-5", "--humaneval_max_tokens must be positive"),
    ("--humaneval_timeout=0", "--humaneval_timeout must be > 0"),
    ("--val_fraction=1", "--val_fraction must be in"),  # every exercise in val: none left to train on
    ("--humaneval_problems=1 --eval_interval=0", "it needs --eval_interval > 0"),
    ("--batch_size=0", "--batch_size must be positive"),  # train's checks, made before the exercises are read
    ("--out_dir=A_FILE", "is a file, not a folder"),
    ("--exercises=", "--exercises must name a JSONL file"),  # was "cannot read --exercises=.: Is a directory"
    ("--exercises=A_FIFO", "cannot read --exercises=.*: it is a FIFO"),  # its open waited for a writer
])
def test_settings_out_of_range_stop_before_anything_is_read(tmp_path, setting, message):
    from config import UserError, parse_settings
    (tmp_path / "a_file").write_text("")
    os.mkfifo(tmp_path / "a_fifo")
    cfg = parse_settings(finetune.DEFAULTS, argv=[f"--exercises={tmp_path / 'never_read.jsonl'}",
                                                  f"--out_dir={tmp_path / 'out'}",
                                                  *setting.replace("A_FILE", str(tmp_path / "a_file"))
                                                  .replace("A_FIFO", str(tmp_path / "a_fifo")).split()])
    with pytest.raises(UserError, match=message):
        finetune.finetune(cfg)


def test_a_score_that_overflows_float16_is_zero_with_a_warning_not_the_end_of_the_run(monkeypatch, capsys):
    """The logits of the scored copy going NaN in float16 ended the run, unsaved."""
    from config import parse_settings

    def overflowing(*args, **kwargs):
        raise FloatingPointError("the logits went NaN or infinite in float16")

    monkeypatch.setattr(finetune.evaluate, "pass_at_1", overflowing)
    cfg = parse_settings(finetune.DEFAULTS, argv=["--humaneval_problems=2"])
    assert finetune.humaneval_score(cfg)(None)[1] == 0.0
    assert "warning: HumanEval pass@1 taken as 0: the logits went NaN" in capsys.readouterr().err


def test_help_describes_finetunings_own_settings():
    text = cli("--help").stdout
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  --")}
    assert "base model's" in lines["--dropout"]
    assert "batches" in lines["--seed"] and "prepare.py" not in lines["--seed"]  # finetune splits exercises itself


def test_a_step_in_micro_steps_trains_as_the_step_in_one_batch(tmp_path, base):
    """Batch 4 in one micro-step and in 2 of 2: the same weights, though the micro-steps
    count different numbers of targets (bodies of many lengths), since each counted target of a
    step weighs the same."""
    from config import parse_settings
    varied = [(f'def f_{i}(x):\n    """Add {i % 4} ones."""\n', f"    return x{' + 1' * (i % 4) * (i % 5)}\n")
              for i in range(24)]
    path = write_exercises(tmp_path / "ex.jsonl", varied)
    data = finetune.Exercises(varied, 64, "completion", 0.0, "ex", validate=False)
    assert data.counted(1337, 0, range(2)) != data.counted(1337, 0, range(2, 4))  # micro-steps weigh differently
    models = []
    for batch_size in (4, 2):
        cfg = parse_settings(finetune.DEFAULTS, argv=[
            f"--base={base}", f"--exercises={path}", f"--batch_size={batch_size}", "--total_batch_size=4",
            "--max_iters=2", "--warmup_iters=0", "--learning_rate=1e-3", "--eval_interval=0", "--sample_tokens=0",
            "--dropout=0.0", "--checkpoint_interval=0", f"--out_dir={tmp_path / str(batch_size)}"])
        models.append(finetune.finetune(cfg).state_dict())
    initial = torch.load(base, weights_only=True)["model"]
    assert not torch.equal(models[0]["lm_head.weight"], initial["lm_head.weight"])  # it trained
    for name, tensor in models[0].items():
        torch.testing.assert_close(models[1][name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_synth_exercises_are_what_finetune_trains_on(tmp_path):
    """The contract between synth.py and finetune.py: each record trains as its prompt, then its
    body and <|endoftext|>, joined with no newline lost or added, and the loss counts the body and
    <|endoftext|> alone."""
    import synth
    from llm_server import FakeLLM
    out = tmp_path / "ex.jsonl"
    with FakeLLM() as server:
        synth.main(["exercises", "--n=6", f"--out={out}", f"--api_base={server.url}", "--model=fake",
                    "--check_examples=false"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    items, malformed, _, _ = finetune.read_exercises(out)
    assert items == [(r["prompt"], r["completion"]) for r in records] and not malformed and len(items) == 6
    tokens, mask = finetune.Exercises(items, 8, "completion", 0.0, "ex", validate=False).splits["train"]
    eot = tokenizer.decode([tokenizer.EOT])
    assert tokenizer.decode(tokens.tolist()) == "".join(r["text"] + eot for r in records)
    assert tokenizer.decode(tokens[mask].tolist()) == "".join(r["completion"] + eot for r in records)
    assert tokenizer.decode(tokens[~mask].tolist()) == "".join(r["prompt"] for r in records)
    for r in records:  # as a HumanEval prompt ends, and its completion begins
        assert r["prompt"].endswith('    """\n') and r["completion"].startswith("    return ")
        assert r["completion"].endswith("\n") and not r["completion"].endswith("\n\n")
