"""toy_pipeline.sh, README's "pipeline at toy scale", end to end with tiny sizes."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pipeline(env: dict, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """toy_pipeline.sh, stopped past the timeout as a user would stop it (subprocess.run's
    SIGKILL of bash alone left its stage and servers running into the other tests)."""
    with subprocess.Popen(["bash", str(ROOT / "toy_pipeline.sh")], env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(process, env["OUT"])
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def stop(script: subprocess.Popen, out: str) -> None:
    """A SIGTERM to the script, which stops its stage and servers; then a SIGKILL to whatever
    of it still runs (the stages run in process groups of their own)."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        script.send_signal(signal.SIGTERM)
        script.wait(timeout=30)
    subprocess.run(["pkill", "-KILL", "-f", out])


def test_every_stage_runs_and_leaves_its_output(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sizes = dict(OUT=str(tmp_path / "toy"), LOCAL_INPUTS=f"{stdlib / 'json'},{stdlib / 'email'}", PRESET="tiny",
                 PRETRAIN_ITERS="4", FINETUNE_ITERS="2", N_WEB="40", N_ANNOTATE="30", N_SYNTH="16",
                 EVAL_PROBLEMS="2", MAX_NEW_TOKENS="8", SERVE_PORT=str(free_port()), TEACHER_PORT=str(free_port()))
    env = {**os.environ, **sizes, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = run_pipeline(env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Terminated" not in result.stdout + result.stderr  # the shell's notice of the servers' end
    toy = tmp_path / "toy"
    count = lambda path: len(path.read_text().splitlines())  # noqa: E731
    assert count(toy / "textbooks.jsonl") == 16 and count(toy / "exercises.jsonl") == 16
    assert count(toy / "annotations.jsonl") >= 20
    kept = count(toy / "filtered" / "kept-00000-of-00001.jsonl")
    web = count(toy / "web" / "part-00000.jsonl")  # json's and email's files, at most N_WEB
    assert 20 < web <= 40 and 0 < kept < web  # the filter kept some, not all
    for name in ("base", "phi1-base", "phi1"):
        assert (toy / name / "ckpt.pt").exists()
    # the evaluation: of the finetuned model, on the first EVAL_PROBLEMS problems, one greedy sample
    # each, its results and summary consistent (a toy model's pass@1 itself may be anything)
    for bench, ids in (("humaneval", ["HumanEval/0", "HumanEval/1"]), ("mbpp", ["MBPP/11", "MBPP/12"])):
        generation = json.loads((toy / bench / "generation.json").read_text())
        assert Path(generation["ckpt"]).resolve() == (toy / "phi1" / "ckpt.pt").resolve()
        assert (generation["bench"], generation["max_new_tokens"], generation["temperature"]) == (bench, 8, 0.0)
        samples = [json.loads(line) for line in (toy / bench / "samples.jsonl").read_text().splitlines()]
        results = [json.loads(line) for line in (toy / bench / "results.jsonl").read_text().splitlines()]
        assert sorted(s["task_id"] for s in samples) == ids and [r["task_id"] for r in results] == ids
        assert {r["task_id"]: r["completion"] for r in results} == {s["task_id"]: s["completion"] for s in samples}
        assert all(isinstance(r["passed"], bool) and r["passed"] == (r["result"] == "passed") for r in results)
        assert all(r["result"].split(":")[0] in ("passed", "failed", "timed out", "crashed") for r in results)
        summary = json.loads((toy / bench / "summary.json").read_text())
        passed = sum(r["passed"] for r in results)
        assert (summary["bench"], summary["problems"], summary["samples"]) == (bench, 2, 2)
        assert summary["pass@1"] == passed / 2 and summary["counts"]["passed"] == passed
        assert sum(summary["counts"].values()) == 2 and "pass@10" not in summary
    report = json.loads((toy / "decontamination.json").read_text())
    assert report["documents"] == report["parsed"] == 16 and report["problems"] == 664
    assert "=== " in result.stdout and "done:" in result.stdout

    # run again (as after an interruption), it finds every stage done: the pretraining runs were
    # started anew by --init_from=scratch, and a signal then left an early checkpoint in place of the last
    env.update(SERVE_PORT=str(free_port()), TEACHER_PORT=str(free_port()))
    again = run_pipeline(env, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already finished 4 steps") == 2 and "training anew" not in again.stderr


def test_a_signal_to_the_script_alone_stops_its_running_stage_which_keeps_its_work(tmp_path):
    """The stage ran on after the script was killed (the script waits for it in the
    foreground, and a trap runs only after that): a rerun found the stage's lock taken."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path / "toy"
    env = {**os.environ, "OUT": str(out), "LOCAL_INPUTS": str(stdlib / "json"), "PRETRAIN_ITERS": "100000",
           "SERVE_PORT": str(free_port()), "TEACHER_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for to_group, status in ((False, 143), (True, 130)):  # a kill of the script alone; Ctrl-C, which the group gets
        shutil.rmtree(out / "base", ignore_errors=True)  # stage 2 from its start (stage 1's data stays)
        with subprocess.Popen(["bash", str(ROOT / "toy_pipeline.sh")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) as script:
            try:
                for line in script.stdout:  # until stage 2 trains (past its first validation: its handler is set)
                    if line.startswith("step 0: val loss"):
                        break
                if to_group:
                    os.killpg(script.pid, signal.SIGINT)
                else:
                    script.send_signal(signal.SIGTERM)
                assert script.wait(timeout=120) == status
                rest = script.stdout.read()
                alive = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
                assert not alive, f"left running: {alive}"
            finally:
                stop(script, str(out))  # never a leak into other tests
        # the stage stopped as on one Ctrl-C, and saved: a second signal is said again (or stops it at once)
        assert rest.count("saving a checkpoint") == 1 and "saved" in rest and "interrupted" not in rest, rest
        assert (out / "base" / "ckpt.pt").exists()


def test_a_signal_while_the_servers_run_stops_them_before_the_script_exits(tmp_path):
    """The exit trap sent them SIGTERM and did not wait: the script was gone while the model's
    server still ran its shutdown, a stray process for whoever ran it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, teacher_port = tmp_path / "toy", free_port()
    env = {**os.environ, "OUT": str(out), "LOCAL_INPUTS": str(stdlib / "json"), "PRETRAIN_ITERS": "1",
           "N_SYNTH": "100000", "SERVE_PORT": str(free_port()), "TEACHER_PORT": str(teacher_port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with subprocess.Popen(["bash", str(ROOT / "toy_pipeline.sh")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as script:
        try:
            for line in script.stdout:  # until stage 4 asks the model's server for textbooks
                if line.startswith("textbook:") or "4. synthesize" in line:
                    break
            time.sleep(2)
            script.send_signal(signal.SIGTERM)
            assert script.wait(timeout=120) == 143
            alive = "".join(subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
                            for pattern in (str(out), f"llm_server.py --port={teacher_port}"))  # (the teacher's)
            assert not alive, f"left running: {alive}"
        finally:
            stop(script, str(out))


def test_a_port_in_use_stops_the_run_before_any_work_in_an_out_of_the_callers(tmp_path):
    """A server left from an earlier run on SERVE_PORT would answer stage 3's requests in
    place of the new model (old textbooks from an old model, without a word). A relative OUT
    is the caller's, not the checkout's (the script changes into it)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "OUT": "toy", "SERVE_PORT": str(port), "TEACHER_PORT": str(free_port()),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        result = run_pipeline(env, timeout=60, cwd=tmp_path)
    assert result.returncode == 1 and f"port {port} is in use" in result.stderr, result.stderr
    assert "=== " not in result.stdout and not any((tmp_path / "toy").iterdir())  # no stage started
    assert not (ROOT / "toy").exists()


def test_settings_that_would_fail_stages_later_stop_it_before_any_work(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "toy"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for settings, message in [(dict(SERVE_PORT="8o11"), "SERVE_PORT must be a port, from 1 to 65535, not '8o11'"),
                              (dict(TEACHER_PORT="70000"), "TEACHER_PORT must be a port, from 1 to 65535"),
                              (dict(N_WEB="99999999999999999999"), "N_WEB must be a whole number above 0"),
                              (dict(SERVE_PORT="9000", TEACHER_PORT="9000"), "must differ"),  # stage 4's puzzle
                              (dict(PRESET="huge"), "PRESET=huge is no preset of model.py"),  # after stage 1's minutes
                              # its 64-token context holds no textbook prompt: stage 4, after two stages' work
                              (dict(PRESET="nano"), "PRESET=nano has a context of 64 tokens"),
                              (dict(EVAL_PROBLEMS="-1"), "EVAL_PROBLEMS must be a whole number"),  # at stage 9
                              # one textbook leaves stage 7 no validation tokens, one exercise stage 8 nothing to train on
                              (dict(N_SYNTH="1"), "N_SYNTH must be a whole number above 1"),
                              (dict(N_SYNTH="0"), "N_SYNTH must be a whole number above 1")]:  # at stage 8
        result = run_pipeline({**env, **settings}, timeout=60)
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert "=== " not in result.stdout and not (tmp_path / "toy").exists()


def test_help_lists_the_settings_and_an_argument_is_refused_before_any_work(tmp_path):
    """Its settings are environment variables: `--help` (or a flag given as to the other
    scripts) must not start a 20-minute run."""
    env = {**os.environ, "OUT": str(tmp_path / "toy")}
    shown = subprocess.run(["bash", str(ROOT / "toy_pipeline.sh"), "--help"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "toy scale" in shown.stdout
    assert "PRETRAIN_ITERS=${PRETRAIN_ITERS:-200}" in shown.stdout and "set -euo" not in shown.stdout
    for argument in ("--max_iters=5", ""):  # an empty one too (a script's "$SETTING" unset): it started the run
        wrong = subprocess.run(["bash", str(ROOT / "toy_pipeline.sh"), argument], env=env, capture_output=True,
                               text=True, timeout=60)
        assert wrong.returncode == 2 and "takes no arguments" in wrong.stderr
        assert "=== " not in shown.stdout + wrong.stdout and not (tmp_path / "toy").exists()


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    """It ended in mkdir's own error, exit 1."""
    (tmp_path / "file").write_text("")
    env = {**os.environ, "OUT": str(tmp_path / "file"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = run_pipeline(env, timeout=60)
    assert result.returncode == 2 and result.stderr == f"error: OUT={tmp_path / 'file'} is a file, not a folder\n"


def test_the_stand_in_teacher_says_a_busy_port_in_one_line_and_stops_quietly_on_ctrl_c():
    """Run by hand as README shows, tests/llm_server.py is a user's command too."""
    teacher = [sys.executable, str(ROOT / "tests" / "llm_server.py")]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused = subprocess.run([*teacher, f"--port={port}"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.strip() == f"cannot listen on 127.0.0.1:{port}: Address already in use (choose another --port)"
    with subprocess.Popen([*teacher, f"--port={free_port()}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as server:
        assert server.stdout.readline().startswith("stand-in teacher at http://127.0.0.1:")
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 130 and err == "", err
