"""Finetune a pretrained phi-1 model on exercises: signature and docstring in, body out.

    python finetune.py --base=out/ckpt.pt --exercises=out/exercises.jsonl      # the recipe (its last step)
    torchrun --standalone --nproc_per_node=8 finetune.py --base=out/phi-1-base/ckpt.pt \\
        --exercises=out/exercises.jsonl --batch_size=32 --compile --humaneval_problems=164

The defaults are the paper's finetuning recipe: 256 sequences a step, peak lr 1e-4,
warmup 50, weight decay 0.01, 6K steps, a checkpoint every 1000 (ckpt.pt, each one
over the last: the paper keeps the best, which takes --humaneval_problems, below).
Everything but the data is train.py's, called, not copied: the loop, DDP under
torchrun, bf16, exact resume (rerun the same command), SIGTERM, NaN checks, logs.
--base is the model to start from: our checkpoint, a Hugging Face phi folder or hub id.

The data. Each exercise ({"prompt", "completion"} per JSONL line, as synth.py
writes them) becomes prompt tokens + completion tokens + <|endoftext|>, the prompt
and completion encoded apart, as evaluation will see them. Exercises are packed one
after another into one token stream, and batches are windows of the context length
drawn from it like train.py's: attention crosses exercise boundaries inside a
window, as in pretraining; the <|endoftext|> between them says where one ends, and
no window is padded. The loss counts the completion tokens and the <|endoftext|>
ending them (--loss_on=all: every token), so the model learns to write bodies, not
docstrings, and to stop; every counted token of a step weighs the same, however the
step is split into micro-batches and processes. Exercises go to val by a hash of
their text. Malformed lines are skipped and counted; exact repeats are kept, and
counted in a note. Exercises whose own docstring examples failed in synth.py's
sandbox check are kept, as the paper checks nothing (--drop_failing leaves them out).

With --humaneval_problems=N, each validation loss comes with the greedy pass@1 on
the first N HumanEval problems (evaluate.py's sandbox), and the best model so far is
kept in out_dir/best.pt, as the paper keeps the best of its checkpoints (of a tie, the
later one: the base model, scored at step 0, is kept only if no finetuned one does as well).
Chosen on HumanEval itself, best.pt's HumanEval score is optimistic; ckpt.pt's is not.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import evaluate
import tokenizer
import train
from config import UserError, counted_lines, parse_settings, require, run

# train.py's settings, less those that choose the model and data, with the paper's finetuning recipe
DEFAULTS = {key: value for key, value in train.DEFAULTS.items()
            if key not in ("data", "preset", "init_from", "block_size")}
DEFAULTS.update(
    base="out/ckpt.pt",  # the model to finetune: our checkpoint, a Hugging Face phi folder or hub id
    exercises="out/exercises.jsonl",  # JSONL of {"prompt", "completion"} (synth.py exercises)
    out_dir="out/finetune",  # checkpoints go to out_dir/ckpt.pt, the best one to out_dir/best.pt
    loss_on="completion",  # completion (the body and its <|endoftext|>) or all (every token)
    drop_failing=False,  # leave out exercises whose own docstring examples failed (synth.py's "examples" verdict)
    val_fraction=0.02,  # share of exercises (by a hash of their text) kept for the validation loss (one at least; none without validation)
    humaneval_problems=0,  # HumanEval problems scored with each validation loss (0: none, 164: all)
    humaneval_max_tokens=256,  # tokens per HumanEval completion at most
    humaneval_timeout=3.0,  # seconds each HumanEval program may run (evaluate.py's --timeout)
    batch_size=8,  # sequences per micro-step and process
    total_batch_size=256,  # sequences per optimizer step over all processes (paper: 256)
    learning_rate=1e-4,  # peak learning rate (paper: 1e-4)
    warmup_iters=50,  # linear warmup steps (paper: 50)
    weight_decay=0.01,  # AdamW decay of weight matrices (paper: 0.01)
    max_iters=6000,  # optimizer steps in all (paper: 6000)
    stop_iters=0,  # stop after this step, the schedule still max_iters' (0: max_iters)
    checkpoint_interval=1000,  # steps between checkpoints, one at the end too (paper: 1000; 0: none but on SIGTERM)
    eval_interval=1000,  # steps between validation losses (and HumanEval), one at the end too
    dropout=None,  # attention and residual dropout (None: the base model's)
    seed=train.DEFAULTS["seed"],  # batches and dropout noise; exercises go to val by a hash of their text
)


HUMANEVAL_PROBLEMS = 164


FAILING = ("failed", "timed out", "crashed")  # synth.py's verdicts on examples that did not pass


def read_exercises(path: Path, drop_failing: bool = False) -> tuple[list[tuple[str, str]], list[int], int, int]:
    """(prompt, completion) of each well-formed line, the numbers of the malformed lines,
    the number of exercises left out because their examples failed (with drop_failing),
    and the number of those whose examples were never run (kept: nothing says they fail)."""
    if path.is_fifo():  # its open would wait for a writer, for ever
        raise UserError(f"cannot read --exercises={path}: it is a FIFO")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"cannot read --exercises={path}: {e.strerror or e}") from None
    exercises, malformed, failing, unchecked = [], [], 0, 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8-sig"))  # UTF-8 only: json.loads of bytes takes UTF-16
            prompt, completion = record["prompt"], record["completion"]
            if not (isinstance(prompt, str) and isinstance(completion, str) and completion.strip()):
                raise ValueError
            (prompt + completion).encode()  # a lone surrogate ("\ud800" is valid JSON) is no text
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
            malformed.append(number)
            continue
        verdict = str(record.get("examples", "unchecked"))
        if drop_failing and verdict.startswith(FAILING):
            failing += 1
            continue
        unchecked += verdict == "unchecked"
        exercises.append((prompt, completion))
    return exercises, malformed, failing, unchecked


ENCODE_CHUNK = 10_000  # exercises tokenized at a time


class Exercises:
    """Exercises packed into one token stream per split, with a loss mask; batches are
    drawn like train.Mixture's (each row a pure function of seed, step and row)."""

    def __init__(self, exercises: list[tuple[str, str]], block_size: int, loss_on: str,
                 val_fraction: float, name: str, validate: bool = True):
        self.block_size, self.names = block_size, [name]
        self.too_long = 0  # exercises longer than a window: cut, and their prompts fill whole windows
        digests = [hashlib.sha256((p + c).encode()).digest() for p, c in exercises]
        in_val = [validate and int.from_bytes(d[:8], "big") < val_fraction * 2**64 for d in digests]
        if validate and not any(in_val):  # a tiny set: its most val-like exercise goes to val (every copy)
            pick = min(digests)
            in_val = [d == pick for d in digests]
            if all(in_val):  # copies of one exercise: one copy, as of a set of one
                in_val = [i == 0 for i in range(len(digests))]
        parts = {False: ([], []), True: ([], [])}  # in val? -> (token arrays, mask arrays)
        for start in range(0, len(exercises), ENCODE_CHUNK):  # a chunk at a time: no Python int per token
            chunk = exercises[start:start + ENCODE_CHUNK]
            prompts = tokenizer.encode_batch([p for p, _ in chunk])
            bodies = tokenizer.encode_batch([c for _, c in chunk])
            for prompt, body, val in zip(prompts, bodies, in_val[start:]):
                tokens, mask = parts[val]
                tokens.append(np.array(prompt + body + [tokenizer.EOT], dtype=np.int32))
                self.too_long += len(tokens[-1]) > block_size + 1  # a window: block_size inputs, one more target
                mask.append(np.arange(len(tokens[-1])) >= (0 if loss_on == "all" else len(prompt)))
        self.splits = {}
        for split, val in (("train", False), ("val", True)) if validate else (("train", False),):
            tokens, mask = parts[val]
            if not tokens:
                raise UserError(f"no exercises left for {split} (have {len(exercises)}; " + (
                    "validation holds one out: give at least 2)" if len(exercises) == 1 else
                    f"adjust --val_fraction={val_fraction})"))
            tokens, mask = np.concatenate(tokens), np.concatenate(mask)
            reps = -(-(block_size + 1) // len(tokens))  # a stream shorter than a window repeats
            self.splits[split] = (np.tile(tokens, reps), np.tile(mask, reps))
        mask = self.splits["train"][1]
        self.counted_before = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # [i]: counted in mask[:i]

    def _starts(self, split: str, seed: int, step: int, rows: range) -> np.ndarray:
        end = len(self.splits[split][0]) - self.block_size
        return np.array([train.row_rng(seed, split, step, row).integers(0, end) for row in rows])

    def batch(self, split: str, seed: int, step: int, rows: range, only: int | None = None):
        """(inputs, targets) of shape (len(rows), block_size); targets the loss skips are -1."""
        tokens, mask = self.splits[split]
        window = self._starts(split, seed, step, rows)[:, None] + np.arange(self.block_size + 1)
        targets = np.where(mask[window[:, 1:]], tokens[window[:, 1:]], -1).astype(np.int64)
        return tokens[window[:, :-1]].astype(np.int64), targets

    def counted(self, seed: int, step: int, rows: range) -> int:
        """How many targets of batch("train", seed, step, rows) the loss counts,
        from a running sum of the mask, without building the batch."""
        starts = self._starts("train", seed, step, rows)
        return int((self.counted_before[starts + self.block_size + 1] - self.counted_before[starts + 1]).sum())


def humaneval_score(cfg):
    """The score train.train keeps the best of: greedy pass@1 on the first problems."""
    def score(model):
        try:
            value = evaluate.pass_at_1(model, "humaneval", cfg.humaneval_problems, cfg.humaneval_max_tokens,
                                       batch_size=cfg.batch_size,  # which out of memory advises lowering
                                       timeout=cfg.humaneval_timeout, timeout_setting="--humaneval_timeout")
        except FloatingPointError as e:  # float16 overflowing in the scored copy: no passing sample, and training goes on
            print(f"warning: HumanEval pass@1 taken as 0: {e}", file=sys.stderr)
            value = 0.0
        return (f"HumanEval pass@1 ({cfg.humaneval_problems} problems, {cfg.humaneval_max_tokens} tokens at most)",
                value)
    return score


def finetune(cfg):
    """Finetune as cfg says (DEFAULTS' settings); returns the finetuned model."""
    rank, world, device = train.setup_processes(cfg.device)
    master = rank == 0  # under torchrun, the first process speaks
    path = Path(cfg.exercises)
    # the model is --base's (rerunning resumes out_dir's checkpoint: train.build_model)
    cfg.preset, cfg.block_size, cfg.init_from = "", None, cfg.base
    with train.together(world, device):  # a mistake is one line, from one process
        train.check_settings(cfg)  # before the exercises are read
        require((cfg.exercises.strip() != "", "--exercises must name a JSONL file of exercises"),  # (not ".")
                (cfg.loss_on in ("completion", "all"), f"--loss_on must be completion or all, not {cfg.loss_on!r}"),
                (0 <= cfg.val_fraction < 1, f"--val_fraction must be in [0, 1), not {cfg.val_fraction}"),
                (0 <= cfg.humaneval_problems <= HUMANEVAL_PROBLEMS,
                 f"--humaneval_problems must be 0 to {HUMANEVAL_PROBLEMS}, not {cfg.humaneval_problems}"),
                (cfg.humaneval_max_tokens > 0,
                 f"--humaneval_max_tokens must be positive, not {cfg.humaneval_max_tokens}"),
                (0 < cfg.humaneval_timeout <= evaluate.DAY,
                 f"--humaneval_timeout must be > 0 and at most {evaluate.DAY:g} s, not {cfg.humaneval_timeout}"),
                (cfg.humaneval_problems == 0 or cfg.eval_interval > 0,
                 "--humaneval_problems scores at each validation: it needs --eval_interval > 0"),
                (cfg.base not in ("auto", "scratch"), f"--base must name the weights to finetune (a checkpoint, "
                                                      f"a Hugging Face folder or hub id), not {cfg.base}"))
        exercises, malformed, failing, unchecked = read_exercises(path, cfg.drop_failing)
        skipped = [f"skipped {counted_lines(malformed, 'malformed')}: each needs a string prompt and a completion "
                   f"that is not blank"] if malformed else []
        skipped += [f"left out {failing} exercises whose docstring examples failed (--drop_failing)"] if failing else []
        if not exercises:  # saying why, where the file is all of the wrong form
            raise UserError(f"no exercises in {path}" + "".join(f"; {line}" for line in skipped))
    if skipped and master:
        print(f"{path}: " + "; ".join(skipped))
    if (repeats := len(exercises) - len(set(exercises))) and master:  # synth.py writes none: files joined?
        print(f"note: {repeats:,} exercises of {path} repeat one before them word for word; each is trained on, "
              f"so it weighs as often as it is there", file=sys.stderr)
    if cfg.drop_failing and unchecked and master:
        print(f"note: --drop_failing: the examples of {unchecked:,} exercises were never run (\"unchecked\" or no "
              f"verdict): they are kept", file=sys.stderr)
    # a resume warns when the exercises changed (the file rewritten, not only renamed)
    content = hashlib.sha256()
    for prompt, completion in exercises:  # lengths first: the boundary between texts counts
        content.update(f"{len(prompt)},{len(completion)}:{prompt}{completion}".encode())
    # (without validation no exercise is held out: a resume that turns it on or off trains on others)
    cfg.exercises_content = (f"{len(exercises):,} exercises, sha256 {content.hexdigest()[:16]}"
                             + ("" if cfg.eval_interval > 0 else ", none held out for validation"))
    same_exercises = train.same_everywhere(cfg.exercises_content, world, device)
    with train.together(world, device):
        if not same_exercises:
            raise UserError(f"processes read different exercises (process {rank}: {cfg.exercises_content}): "
                            f"--exercises must hold the same file on every node")
    if master:
        print(f"{len(exercises):,} exercises from {path}")

    def make_data(config):  # windows of the model's context length
        if cfg.humaneval_problems > 0:  # now, not at the first validation
            evaluate.prompt_room(config.block_size, cfg.humaneval_max_tokens, "--humaneval_max_tokens")
        data = Exercises(exercises, config.block_size, cfg.loss_on, cfg.val_fraction, path.stem,
                         validate=cfg.eval_interval > 0)
        tokens, mask = data.splits["train"]
        if master:
            print(f"train: {len(tokens):,} tokens, {mask.mean():.0%} of them counted by the loss "
                  f"(--loss_on={cfg.loss_on})")
        if data.too_long and master:
            print(f"warning: {data.too_long:,} exercises are longer than the context ({config.block_size} tokens): "
                  f"windows cut them, and a window inside a long prompt counts no target", file=sys.stderr)
        return data

    score = humaneval_score(cfg) if cfg.humaneval_problems > 0 else None
    return train.train(cfg, make_data, score)


def main():
    cfg = parse_settings(DEFAULTS, __doc__)
    try:
        finetune(cfg)
    finally:
        if train.dist.is_initialized():
            train.dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
