"""synth.py against a local fake OpenAI-compatible server that injects faults, and against
sample.py --serve: exact record counts, no duplicates, resume after kill -9 and Ctrl-C, bad input."""

import contextlib
import dataclasses
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import llm
import llm_server
import synth
from config import UserError
from data.prepare import Appender
from llm_server import FakeLLM

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ["ok", "429", "ok", "500", "ok", "slow", "ok", "malformed", "ok", "drop", "ok", "cut", "ok", "empty",
          "ok", "503"]
FAST = ["--model=fake", "--concurrency=4", "--timeout=0.3", "--backoff=0.01", "--max_retries=10"]


@pytest.fixture(scope="module")
def server():
    with FakeLLM(faults=FAULTS, latency=0.005, slow=0.5) as server:
        yield server


def synthesize(server, kind, out, *args):
    """Run synth.py in this process; the report it writes."""
    synth.main([kind, f"--out={out}", f"--api_base={server.url}", *FAST, *args])
    return json.loads(Path(f"{out}.report.json").read_text())


def lines(path):
    return Path(path).read_text().splitlines()


def records(path):
    return [json.loads(line) for line in lines(path)]


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """Uninterrupted runs of each kind, to compare interrupted ones with."""
    folder = tmp_path_factory.mktemp("reference")
    runs = {"textbook": 40, "exercises": 24}
    for kind, n in runs.items():
        synthesize(server, kind, folder / f"{kind}.jsonl", f"--n={n}")
    return {kind: (folder / f"{kind}.jsonl", n) for kind, n in runs.items()}


def cli(*args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "synth.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for_lines(path, count, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.01)
    pytest.fail(f"{path} did not reach {count} lines (exit {proc.poll()})")


# ---------------------------------------------------------------- runs through faults

def test_textbook_run_through_faults(server, reference):
    path, n = reference["textbook"]
    got = records(path)
    assert len(got) == n and len({r["id"] for r in got}) == n
    assert [r["id"] for r in got] == sorted((r["id"] for r in got), key=lambda i: int(i.split("-")[-1]))
    for r in got:
        assert r["text"] and r["model"] == "fake" and r["constraints"] == synth.draw("textbook", 1337, int(
            r["id"].split("-")[-1]))
    dedup = synth.Dedup(0.8)
    assert all(dedup.add(r["id"], r["text"]) is None for r in got)  # no duplicates left
    report = json.loads(Path(f"{path}.report.json").read_text())
    assert report["records"] == n and report["run"]["written"] == n
    assert set(report["run"]["failed_attempts"]) == {"rate_limit", "server", "timeout", "bad_response", "connection"}
    skipped = records(f"{path}.skipped")
    assert report["dropped"]["near duplicate"] + report["dropped"]["duplicate"] == len(skipped) > 0
    assert 0 < report["duplicate_rate"] < 1 and 0 < report["distinct_ngrams"]["1"] < 1
    assert report["coverage"]["audiences"]["of"] == len(synth.AUDIENCES)


def test_exercises_run_through_faults(reference):
    path, n = reference["exercises"]
    got = records(path)
    assert len(got) == n and len({r["id"] for r in got}) == n
    verdicts = set()
    for r in got:
        name = r["constraints"]["name"]
        assert r["text"] == r["prompt"] + r["completion"]
        assert synth.parse_exercise(r["text"], name) == (r["prompt"], r["completion"])
        assert r["prompt"].startswith(f"def {name}(") and r["completion"].startswith("    return")
        verdicts.add(r["examples"].split(":")[0])
    assert verdicts == {"passed", "failed"}  # the fake server gets one example in 8 wrong
    report = json.loads(Path(f"{path}.report.json").read_text())
    assert report["run"]["invalid_answers"] > 0 and report["dropped"]["given up"] == len(
        lines(f"{path}.skipped"))


def test_a_rerun_of_a_finished_file_does_nothing_and_keeps_the_totals(server, reference, tmp_path):
    """A rerun's report kept only its own run, all zeros: the cost of the runs before was lost."""
    path, n = reference["textbook"]
    for name in (path.name, f"{path.name}.skipped", f"{path.name}.report.json"):
        (tmp_path / name).write_bytes((path.parent / name).read_bytes())
    path = tmp_path / path.name
    before, first = path.read_bytes(), json.loads(Path(f"{path}.report.json").read_text())
    report = synthesize(server, "textbook", path, f"--n={n}", "--api_base=http://127.0.0.1:1/v1")  # no requests
    assert path.read_bytes() == before and report["run"]["requests"] == 0
    totals = report["all_runs"]
    assert totals["runs"] == 2 and first["all_runs"]["runs"] == 1
    assert (totals["requests"], totals["tokens_out"], totals["written"]) == (
        first["run"]["requests"], first["run"]["tokens_out"], n) and totals["tokens_out"] > 0


def test_killed_and_restarted_run_equals_an_uninterrupted_one(server, reference, tmp_path):
    path, n = reference["exercises"]
    out = tmp_path / "exercises.jsonl"
    with FakeLLM(faults=FAULTS, latency=0.05, slow=0.5) as slow_server:
        proc = cli("exercises", f"--n={n}", f"--out={out}", f"--api_base={slow_server.url}", *FAST)
        wait_for_lines(out, 5, proc)
        proc.kill()
        proc.wait()
    assert 5 <= len(lines(out)) < n
    synthesize(server, "exercises", out, f"--n={n}")
    assert lines(out) == lines(path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])  # SIGHUP: it killed the run
def test_ctrl_c_finishes_the_items_in_flight_then_a_rerun_completes(server, reference, tmp_path, sig):
    path, n = reference["textbook"]
    out = tmp_path / "textbook.jsonl"
    with FakeLLM(faults=FAULTS, latency=0.1, slow=0.5) as slow_server:
        proc = cli("textbook", f"--n={n}", f"--out={out}", f"--api_base={slow_server.url}", *FAST)
        wait_for_lines(out, 3, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopping" in stderr and "records written" in stdout
    assert 3 <= len(lines(out)) < n and lines(out) == lines(path)[:len(lines(out))]  # whole lines, in order
    synthesize(server, "textbook", out, f"--n={n}")
    assert lines(out) == lines(path)


def test_a_torn_last_line_is_cut_off(server, reference, tmp_path):
    path, n = reference["textbook"]
    out = tmp_path / "textbook.jsonl"
    kept = lines(path)[:5]
    out.write_text("\n".join(kept) + "\n" + lines(path)[5][:40])
    synthesize(server, "textbook", out, f"--n={n}")
    assert lines(out) == lines(path)


def test_items_without_records_end_the_run(tmp_path):
    with FakeLLM(answer=lambda body: "  ") as empty:
        with pytest.raises(UserError, match="3 items in a row gave no record .*invalid: empty answer"):
            synthesize(empty, "textbook", tmp_path / "t.jsonl", "--n=5", "--give_up=3", "--attempts=2")
    assert lines(tmp_path / "t.jsonl") == [] and len(lines(tmp_path / "t.jsonl.skipped")) == 3


def test_fatal_failure_mid_run_stops_after_what_came_before(tmp_path):
    with FakeLLM(latency=0.01) as server:
        def answer(body, real=server.answer):  # from the 20th request on, the endpoint refuses our key
            if len(server.served) >= 20:
                server.key = "rotated"
            return real(body)
        server.answer = answer
        with pytest.raises(UserError, match="refused a request \\(401\\): Incorrect API key"):
            synthesize(server, "textbook", tmp_path / "t.jsonl", "--n=500", "--concurrency=2")
    got = [int(r["id"].split("-")[-1]) for r in records(tmp_path / "t.jsonl")]
    assert 10 <= len(got) < 20 and got == sorted(got)


def test_items_whose_requests_failed_are_asked_for_again_by_a_rerun(server, tmp_path):
    n, out = 30, tmp_path / "t.jsonl"
    with FakeLLM(faults=["ok", "ok", "500"]) as flaky:  # one request in 3 fails, for good: no retries
        with pytest.raises(UserError, match="items got no answer .*server 500.*run the same command again"):
            synthesize(flaky, "textbook", out, f"--n={n}", "--max_retries=0", "--attempts=1")
    first = [r["id"] for r in records(out)]
    report = json.loads(Path(f"{out}.report.json").read_text())
    unanswered = report["run"]["unanswered_items"]
    assert unanswered > 0 and len(first) + unanswered == n  # they keep their slots
    skipped = records(f"{out}.skipped") if Path(f"{out}.skipped").exists() else []
    assert all("duplicate of" in s["reason"] for s in skipped) and report["dropped"]["given up"] == 0
    seen = set(first) | {s["id"] for s in skipped}
    missing = {f"textbook-1337-{i}" for i in range(len(seen) + unanswered)} - seen  # items 0, 1, ... were asked for
    assert len(missing) == unanswered
    report = synthesize(server, "textbook", out, f"--n={n}")  # the endpoint is well again
    got = [r["id"] for r in records(out)]
    skipped = [s["id"] for s in records(f"{out}.skipped")] if Path(f"{out}.skipped").exists() else []
    assert got[:len(first)] == first and len(got) == len(set(got)) == n and not set(got) & set(skipped)
    assert missing <= set(got) | set(skipped) and report["run"]["unanswered_items"] == 0
    dedup = synth.Dedup(0.8)
    assert all(dedup.add(r["id"], r["text"]) is None for r in records(out))


@pytest.mark.parametrize("setting, faults, message", [
    ("--max_tokens=0", ["ok"], r"400: max_tokens must be at least 1"),
    # vLLM's message names each request's token counts: refusals alike all the same
    ("--max_tokens=1000", ["context"], r"400: This model's maximum context length is 1024 tokens\. "
                                                     r"However, you requested \d+ tokens")])
def test_a_setting_the_endpoint_refuses_is_named_and_its_items_are_retried(tmp_path, monkeypatch, setting, faults,
                                                                            message):
    monkeypatch.setattr(synth, "check_settings", lambda cfg: None)  # a setting synth.py does not know is bad
    out = tmp_path / "t.jsonl"
    with FakeLLM(faults=faults) as server:
        with pytest.raises(UserError, match=rf"refused the last 5 requests alike \({message}.*\): does it take the "
                                            r"settings sent"):
            synthesize(server, "textbook", out, "--n=5", setting)
        assert len(server.served) <= 5 + 4  # one request an item (a refused one is not sent again), 4 in flight
        assert lines(out) == [] and not Path(f"{out}.skipped").exists()
        server.faults = ["ok"]
        synthesize(server, "textbook", out, "--n=5")
    assert [r["id"] for r in records(out)][:4] == [f"textbook-1337-{i}" for i in range(4)]
    assert len(records(out)) == 5


@pytest.mark.parametrize("fault, why", [("filtered", "refused 400: Flagged by the content filter"),
                                        # content null: was retried as malformed, and asked again by each rerun
                                        ("null", "refused 200: an answer without text (finish_reason content_filter)")])
def test_a_request_refused_for_its_item_alone_skips_that_item(tmp_path, fault, why):
    out = tmp_path / "t.jsonl"
    with FakeLLM(faults=["ok", "ok", fault]) as server:  # never two refusals in a row, one item at a time
        report = synthesize(server, "textbook", out, "--n=8", "--concurrency=1")
        refused = [s for s in records(f"{out}.skipped") if s["reason"].startswith("refused:")]
        assert len(records(out)) == 8 and len(refused) >= 3 and refused[0]["reason"].startswith(f"refused: {why}")
        assert server.served.count(fault) == len(refused)  # not asked again
        assert report["dropped"]["given up"] == len(refused) and report["run"]["unanswered_items"] == 0
        asked = len(server.served)
        synthesize(server, "textbook", out, "--n=8")  # judged: nothing is asked again
        assert len(server.served) == asked


def test_answers_cut_off_at_max_tokens_are_no_records_until_a_run_with_more(tmp_path):
    """finish_reason "length" was never read: textbooks cut mid-sentence became records."""
    out = tmp_path / "t.jsonl"
    with FakeLLM(faults=["length"] * 3 + ["ok"] * 100, answer=distinct_prose) as server:
        report = synthesize(server, "textbook", out, "--n=3", "--concurrency=1", "--attempts=1", "--max_tokens=50")
        assert [r["id"] for r in records(out)] == [f"textbook-1337-{i}" for i in range(3, 6)]
        assert [s["reason"] for s in records(f"{out}.skipped")] == ["invalid: cut off at --max_tokens=50"] * 3
        assert (report["run"]["cut_off_answers"], report["dropped"]["given up"]) == (3, 3)
        synthesize(server, "textbook", out, "--n=4", "--max_tokens=50")  # the same budget: judged, not asked again
        assert records(out)[-1]["id"] == "textbook-1337-6"
        report = synthesize(server, "textbook", out, "--n=6", "--max_tokens=100")  # more room: asked again, first
    assert [r["id"] for r in records(out)][4:] == ["textbook-1337-0", "textbook-1337-1"]
    assert report["dropped"]["given up"] == 1 and report["records"] == 6


def test_keep_cut_off_takes_answers_cut_off_as_they_are(tmp_path):
    out = tmp_path / "t.jsonl"
    with FakeLLM(faults=["length"] * 3 + ["ok"] * 100, answer=distinct_prose) as server:
        report = synthesize(server, "textbook", out, "--n=3", "--concurrency=1", "--keep_cut_off")
    assert [r["id"] for r in records(out)] == [f"textbook-1337-{i}" for i in range(3)]
    assert report["run"]["cut_off_answers"] == 0 and not Path(f"{out}.skipped").exists()


def test_answers_cut_off_in_a_row_end_the_run_asking_for_more_tokens(tmp_path):
    with FakeLLM(faults=["length"]) as server:
        with pytest.raises(UserError, match=r"3 items in a row gave no record \(the last: invalid: cut off at "
                                            r"--max_tokens=1024\); raise --max_tokens\?"):
            synthesize(server, "textbook", tmp_path / "t.jsonl", "--n=5", "--give_up=3", "--attempts=1")


def test_answers_cut_off_by_the_models_context_are_not_blamed_on_max_tokens(tmp_path, capsys):
    """A server that cuts max_tokens to the room its context leaves (sample.py --serve, llama.cpp
    with --parallel) ends answers at fewer tokens: synth.py said to raise --max_tokens, and a run
    with a larger one asked for those items again, to be cut off the same way."""
    out = tmp_path / "t.jsonl"
    with FakeLLM(faults=["context_full"] * 3 + ["ok"] * 100, answer=distinct_prose) as server:
        report = synthesize(server, "textbook", out, "--n=3", "--concurrency=1", "--attempts=1")
        reasons = [s["reason"] for s in records(f"{out}.skipped")]
        assert len(reasons) == 3 and all(re.fullmatch(r"invalid: cut off by the model's context after \d+ tokens", r)
                                         for r in reasons), reasons
        assert (report["run"]["cut_off_answers"], report["run"]["context_cut_off_answers"]) == (0, 3)
        said = capsys.readouterr().out
        assert "3 cut off by the model's context: --keep_cut_off keeps them" in said and "raise it" not in said
        asked = len(server.served)
        synthesize(server, "textbook", out, "--n=3", "--max_tokens=4096")  # a verdict: not asked again
        assert len(server.served) == asked
        server.faults = ["context_full"]
        with pytest.raises(UserError, match=r"3 items in a row gave no record \(the last: invalid: cut off by the "
                                            r"model's context after \d+ tokens\); the model's context cuts the "
                                            r"answers short: --keep_cut_off"):
            synthesize(server, "textbook", out, "--n=6", "--give_up=3", "--attempts=1")


def test_a_run_that_gives_up_asks_no_more_for_the_items_in_flight(tmp_path):
    """Their answers would be thrown away: they went on asking (and paying) for all their --attempts."""
    with FakeLLM(faults=["length"], latency=0.1) as server:
        with pytest.raises(UserError, match=r"3 items in a row gave no record"):
            synthesize(server, "textbook", tmp_path / "t.jsonl", "--n=50", "--give_up=3", "--attempts=6",
                       "--concurrency=4")
        # the 4 first items ask 6 times each, in step; then each item in flight asks at most once or twice
        assert len(server.served) <= 4 * 6 + 10  # went to 42-48


def test_the_first_signal_after_an_error_waits_and_the_error_is_still_said(monkeypatch, capsys):
    """A fatal failure sets the client's stop too: the first Ctrl-C then quit at once, as a
    second one does, and the run's error line (and report) were lost."""
    exits = []
    monkeypatch.setattr(synth.os, "_exit", lambda status: exits.append(status))
    stop = threading.Event()
    stop.set()  # as a refused API key does
    with synth.Interrupts(stop) as interrupts:
        interrupts.handle(signal.SIGINT, None)
        assert exits == [] and "waiting for the requests in flight" in capsys.readouterr().err
        interrupts.handle(signal.SIGTERM, None)
        assert exits == [128 + signal.SIGTERM]


def test_a_hangup_ignored_as_under_nohup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with synth.Interrupts(threading.Event()):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_ctrl_c_that_ended_tee_too_still_writes_the_report(tmp_path):
    """Under `2>&1 | tee`, Ctrl-C ends tee too: the handler's line raised BrokenPipeError, and the
    run exited 141 without its report (the run's cost)."""
    out = tmp_path / "t.jsonl"
    with FakeLLM(latency=0.1) as slow_server:
        proc = subprocess.Popen([sys.executable, str(ROOT / "synth.py"), "textbook", "--n=40", f"--out={out}",
                                 f"--api_base={slow_server.url}", *FAST], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        wait_for_lines(out, 2, proc)
        proc.stdout.close()  # tee, gone
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    assert json.loads(Path(f"{out}.report.json").read_text())["run"]["written"] >= 2


def test_a_stdout_gone_loses_no_report(tmp_path, monkeypatch):
    """The summary was printed before the report was written: a stdout gone lost the report."""
    class Gone:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

    out = tmp_path / "t.jsonl"
    with FakeLLM() as server:
        monkeypatch.setattr(sys, "stdout", Gone())
        with pytest.raises(BrokenPipeError):
            synth.main(["textbook", f"--out={out}", f"--api_base={server.url}", *FAST, "--n=2"])
    assert json.loads(Path(f"{out}.report.json").read_text())["run"]["written"] == 2


def test_a_bug_on_an_item_ends_the_run_with_its_report(tmp_path, monkeypatch, capsys):
    """An exception no one expected, raised by an item's worker, left the run with a traceback
    alone: no summary, and no report (the run's cost)."""
    def buggy(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(synth, "to_record", buggy)
    out = tmp_path / "t.jsonl"
    with FakeLLM() as server:
        with pytest.raises(UserError, match=r"^RuntimeError: a bug \(a bug: the traceback above says where\)$"):
            synth.main(["textbook", f"--out={out}", f"--api_base={server.url}", *FAST, "--n=4"])
    assert json.loads(Path(f"{out}.report.json").read_text())["run"]["requests"] > 0
    assert "Traceback" in capsys.readouterr().err and not out.read_text()


def test_a_thread_that_cannot_start_ends_the_run_naming_concurrency(tmp_path, monkeypatch, capsys):
    """"RuntimeError: can't start new thread" was shown as a bug, with its traceback."""
    start, started = threading.Thread.start, []

    def two_at_most(self):  # the run's own threads: the server's start as ever
        if self.name.startswith("item"):
            started.append(self)
            if len(started) > 2:
                raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", two_at_most)
    out = tmp_path / "t.jsonl"
    with FakeLLM(latency=0.05) as server:
        with pytest.raises(UserError, match=r"^cannot start the threads --concurrency=4 asks for \(can't start new "
                                            r"thread\): lower it$"):
            synth.main(["textbook", f"--out={out}", f"--api_base={server.url}", *FAST, "--n=8"])
    assert json.loads(Path(f"{out}.report.json").read_text())["run"]
    assert "Traceback" not in capsys.readouterr().err


def test_an_endpoint_answering_with_a_proxy_page_ends_the_run(tmp_path):
    """A 200 that is no JSON (a proxy's login page) is retried, but it went on for every item of the run."""
    out = tmp_path / "t.jsonl"
    with FakeLLM(faults=["html"]) as server:
        with pytest.raises(UserError, match=r"the requests of the last 5 items failed alike \(bad_response 200: .*"
                                            r"<html>.*\): is http://.* working"):
            synthesize(server, "textbook", out, "--n=50", "--max_retries=1", "--attempts=1", "--concurrency=2")
        assert len(server.served) <= 2 * 10  # 2 requests an item: the 5, those in flight, not the 50
    assert lines(out) == [] and not Path(f"{out}.skipped").exists()  # a rerun asks again


def test_a_request_that_failed_for_good_ends_its_item_without_a_verdict():
    """The next attempt retried for as long again: 3 attempts x 7 tries x 120 s, 44 minutes, before
    a hung endpoint ended the run. Answers before the failure leave no verdict either (a rerun
    asks for the item anew, with all its attempts); a refusal after them leaves theirs."""
    from types import SimpleNamespace

    class Client:  # the first answer is unusable (empty), then the request fails for good
        def __init__(self, failure):
            self.failure, self.asked = failure, 0

        def chat(self, messages, temperature, max_tokens, seed):
            self.asked += 1
            if self.asked == 1:
                return SimpleNamespace(text=" ", finish_reason="stop")
            raise llm.LLMError(self.failure)

    cfg = SimpleNamespace(seed=1337, attempts=3, temperature=1.0, max_tokens=100, model="fake")
    server_error = llm.Failure("server", "The server had an error.", 500)
    client = Client(server_error)
    outcome = synth.make_item("textbook", 0, cfg, client, synth.Dedup(0.8), None, threading.Event())
    assert (outcome.failure, outcome.record, client.asked) == (server_error, None, 2)
    client = Client(llm.Failure("refused", "Flagged by the content filter.", 400))
    outcome = synth.make_item("textbook", 0, cfg, client, synth.Dedup(0.8), None, threading.Event())
    assert (outcome.failure, outcome.reason, client.asked) == (None, "invalid: empty answer", 2)


def test_a_hung_endpoint_ends_the_run_after_one_request_cycle_an_item(tmp_path):
    out = tmp_path / "t.jsonl"
    with FakeLLM(faults=["500"]) as server:
        with pytest.raises(UserError, match=r"the requests of the last 5 items failed alike \(server 500"):
            synthesize(server, "textbook", out, "--n=20", "--max_retries=1", "--attempts=3", "--concurrency=1")
        assert len(server.served) <= 5 * 2 + 2  # 5 items of 2 tries, the next one's in flight (was 31: 3 attempts)
    assert lines(out) == [] and not Path(f"{out}.skipped").exists()  # a rerun asks again


def test_a_second_run_on_the_same_output_stops_at_once_and_records_count_by_id(tmp_path):
    """Two runs at once wrote every record twice, and the second copies counted towards --n."""
    import fcntl
    out = tmp_path / "t.jsonl"
    out.write_text("".join(json.dumps({"id": f"textbook-1337-{i}", "text": f"text {i}"}) + "\n" for i in (0, 1) * 2))
    with FakeLLM(answer=distinct_prose) as server:
        with open(out) as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another run's lock
            for n in (3, 2):  # 2: nothing to do, but its report would race the other run's
                with pytest.raises(UserError, match=f"another run is writing {out}: wait for it"):
                    synthesize(server, "textbook", out, f"--n={n}")
            assert server.served == [] and not Path(f"{out}.report.json").exists()
        synthesize(server, "textbook", out, "--n=3")
    assert [r["id"] for r in records(out)][4:] == ["textbook-1337-2"]


def test_a_write_that_fails_is_one_line_and_a_rerun_completes(server, reference, tmp_path):
    """A full disk (here a file size limit) ended in chained tracebacks, exit 1, and no report."""
    import resource
    path, n = reference["textbook"]
    out = tmp_path / "textbook.jsonl"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))  # noqa: E731
    proc = subprocess.Popen([sys.executable, str(ROOT / "synth.py"), "textbook", f"--n={n}", f"--out={out}",
                             f"--api_base={server.url}", *FAST], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and stderr.startswith(f"error: cannot write {out}: File too large")
    assert stderr.count("\n") == 1 and "records written" in stdout, stderr
    assert Path(f"{out}.report.json").exists() and 0 < len(lines(out)) < n
    synthesize(server, "textbook", out, f"--n={n}")
    assert lines(out) == lines(path)


def test_ctrl_c_cuts_short_a_long_retry_after(tmp_path):
    """Against a server asking for 20 s between retries, Ctrl-C took minutes to exit."""
    with FakeLLM(faults=["429"], retry_after="20") as slow_server:
        proc = cli("textbook", "--n=3", f"--out={tmp_path / 't.jsonl'}", f"--api_base={slow_server.url}",
                   "--model=fake", "--concurrency=2")
        deadline = time.monotonic() + 30
        while len(slow_server.served) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # in the backoffs
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 130 and time.monotonic() - started < 5 and "stopping" in stderr


def test_replies_without_usage_make_the_cost_unknown_not_zero(tmp_path, capsys):
    with FakeLLM(faults=["no_usage"], answer=distinct_prose) as server:
        report = synthesize(server, "textbook", tmp_path / "t.jsonl", "--n=2", "--price_in=1", "--price_out=2")
    assert (report["run"]["cost"], report["run"]["replies_without_usage"], report["all_runs"]["cost"]) == (None, 2,
                                                                                                            None)
    captured = capsys.readouterr()
    assert "cost unknown" in captured.out and "$0.00" not in captured.out
    assert captured.err.count("reports no token usage") == 1


def test_a_run_without_prices_leaves_the_cost_of_all_runs_unknown(tmp_path):
    """It recorded $0: a later run with prices then gave the cost of its own tokens as all."""
    out = tmp_path / "t.jsonl"
    with FakeLLM(answer=distinct_prose) as server:
        assert synthesize(server, "textbook", out, "--n=2")["run"]["cost"] is None
        report = synthesize(server, "textbook", out, "--n=4", "--price_in=1", "--price_out=2")
    assert report["run"]["cost"] > 0 and report["all_runs"]["cost"] is None and report["all_runs"]["runs"] == 2


def test_an_answer_with_a_lone_surrogate_is_written(tmp_path):
    """Dedup encoded the text to UTF-8: a traceback, no report, the run's cost lost."""
    with FakeLLM(answer=lambda body: distinct_prose(body) + " \ud800") as server:
        report = synthesize(server, "textbook", tmp_path / "t.jsonl", "--n=3")
    assert report["run"]["written"] == 3 and all(r["text"].endswith("\ud800") for r in records(tmp_path / "t.jsonl"))


def test_a_full_disk_under_the_sandbox_is_one_line_and_the_report_is_written(tmp_path, monkeypatch):
    """The examples' check writes its files in the temporary folder, often on the output's
    disk: a full one was a traceback, without the report."""
    import evaluate
    real = evaluate.Sandbox.run

    def full(self, units):
        if units[0][0] != "exercise":  # the sandbox's own probe as it starts
            return real(self, units)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/phi1-sandbox-x/tmp1")

    monkeypatch.setattr(evaluate.Sandbox, "run", full)
    out = tmp_path / "e.jsonl"
    with FakeLLM() as server:
        with pytest.raises(UserError, match=r"^cannot write /tmp/phi1-sandbox-x/tmp1: No space left on device"):
            synth.main(["exercises", f"--out={out}", f"--api_base={server.url}", *FAST, "--n=4"])
    assert json.loads(Path(f"{out}.report.json").read_text())["run"]["requests"] > 0


def test_a_signal_while_the_report_is_made_does_not_lose_it(tmp_path):
    """The signal handlers were the default ones once the items were made: a SIGTERM while
    the report was made (it reads the whole output) killed the run without it."""
    script = tmp_path / "signalled.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import config, synth
real = synth.diversity
def signalled(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
synth.diversity = signalled
config.run(synth.main)
""")
    out = tmp_path / "t.jsonl"
    with FakeLLM() as server:
        result = subprocess.run([sys.executable, str(script), "textbook", f"--out={out}", f"--api_base={server.url}",
                                 *FAST, "--n=3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and len(records(out)) == 3, result.stderr[-2000:]
    assert json.loads(Path(f"{out}.report.json").read_text())["run"]["written"] == 3


def test_failed_requests_an_older_version_skipped_are_retried(server, tmp_path):
    out = tmp_path / "t.jsonl"
    Path(f"{out}.skipped").write_text("".join(json.dumps(
        {"id": f"textbook-1337-{i}", "reason": "request failed: refused 400: max_tokens must be at least 1"}) + "\n"
        for i in range(3)))
    report = synthesize(server, "textbook", out, "--n=3")
    assert [r["id"] for r in records(out)] == [f"textbook-1337-{i}" for i in range(3)]
    assert report["dropped"]["given up"] == 0


# ---------------------------------------------------------------- a real server: sample.py --serve

@contextlib.contextmanager
def sample_serve(tmp_path, block_size, *args):
    """The URL of sample.py --serve with a random nano model of block_size tokens of context."""
    import torch  # requirements.txt: a broken install fails, not skips
    import sample
    from config import parse_args
    from model import GPT, PRESETS, load_model
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS["nano"], block_size=block_size)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": GPT(config).state_dict(), "config": dataclasses.asdict(config), "step": 0}, ckpt)
    cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", "--port=0", "--quiet", *args])
    server = sample.Server(cfg)
    server.start(load_model(str(ckpt), torch.device("cpu"), torch.float32), "nano")
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.close()


def test_against_sample_serve(tmp_path):
    out = tmp_path / "textbook.jsonl"
    # room for synth's prompts; a random model's answers end at a stop string, else all would be cut off
    with sample_serve(tmp_path, 512, "--stop=e") as url:
        synth.main(["textbook", "--n=3", f"--out={out}", f"--api_base={url}", "--model=nano", "--max_tokens=64"])
    got = records(out)
    assert len(got) == 3 and all(r["text"] for r in got)


def test_answers_cut_off_by_sample_serves_context_are_judged_so(tmp_path):
    """sample.py --serve cuts max_tokens to the room its context leaves: the answers were blamed on
    --max_tokens=1024, which a rerun with more would ask for again."""
    out = tmp_path / "textbook.jsonl"
    with sample_serve(tmp_path, 256) as url:  # a random model never stops: the context ends each answer
        with pytest.raises(UserError, match=r"2 items in a row gave no record \(the last: invalid: cut off by the "
                                            r"model's context after \d+ tokens\); the model's context"):
            synth.main(["textbook", "--n=2", f"--out={out}", f"--api_base={url}", "--model=nano", "--attempts=1",
                        "--give_up=2"])
    assert [s["reason"].startswith("invalid: cut off by the model's context") for s in records(f"{out}.skipped")] == [
        True, True]


# ---------------------------------------------------------------- bad input

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unreachable", "bad key", "no such model", "unknown subcommand", "unwritable",
                                  "unwritable as root", "bad setting", "bad temperature", "bad max_tokens"])
def test_bad_input_is_one_line_exit_2_and_the_output_intact(case, tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text('{"id": "textbook-1337-0", "text": "kept as it was"}\n')
    before = out.read_bytes()
    with FakeLLM(key="sekrit") as server:
        args = {"unreachable": ["textbook", f"--api_base=http://127.0.0.1:{closed_port()}/v1"],
                "bad key": ["textbook", f"--api_base={server.url}"],
                "no such model": ["textbook", f"--api_base={server.url}", "--model=gpt-9"],
                "unknown subcommand": ["poems", f"--api_base={server.url}"],
                "unwritable": ["textbook", f"--api_base={server.url}", f"--out={out}/x.jsonl"],
                "unwritable as root": ["textbook", f"--api_base={server.url}", "--out=/proc/phi1-t.jsonl"],
                "bad setting": ["textbook", f"--api_base={server.url}", "--n=-1"],
                "bad temperature": ["textbook", f"--api_base={server.url}", "--n=3", "--temperature=-1"],
                "bad max_tokens": ["textbook", f"--api_base={server.url}", "--n=3", "--max_tokens=0"]}[case]
        right_key = case in ("no such model", "unwritable", "unwritable as root", "bad temperature", "bad max_tokens")
        env = {"OPENAI_API_KEY": "sekrit" if right_key else "wrong"}
        proc = cli(f"--out={out}", "--model=fake", *args, env=env)
        stdout, stderr = proc.communicate(timeout=60)
    expected = {"unreachable": "cannot reach http://127.0.0.1:", "bad key": "refused the API key",
                "no such model": "has no model 'gpt-9'", "unknown subcommand": "unknown subcommand 'poems'",
                "unwritable": "cannot write", "unwritable as root": "cannot write /proc/phi1-t.jsonl",
                "bad setting": "--n must be",
                "bad temperature": "--temperature must be in [0, 2]", "bad max_tokens": "--max_tokens must be >= 1"}[case]
    assert proc.returncode == 2 and stdout == ""
    assert stderr.startswith("error: ") and expected in stderr and stderr.count("\n") == 1, stderr
    assert out.read_bytes() == before and not Path(f"{out}.skipped").exists()
    assert server.served == []  # no request sent


def test_a_run_that_cannot_start_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "t.jsonl"
    proc = cli(f"--out={out}", "--model=fake", "textbook", f"--api_base=http://127.0.0.1:{closed_port()}/v1",
               env={"OPENAI_API_KEY": "x"})
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "cannot reach" in stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the parts

def test_constraints_depend_on_seed_and_index_alone_and_vary():
    assert synth.draw("exercises", 7, 3) == synth.draw("exercises", 7, 3) != synth.draw("exercises", 7, 4)
    assert synth.messages("textbook", synth.draw("textbook", 7, 3)) == synth.messages(
        "textbook", synth.draw("textbook", 7, 3))
    assert len(synth.SUBTOPICS) >= 500 and len(set(synth.SUBTOPICS)) == len(synth.SUBTOPICS)
    for name in ("AUDIENCES", "STYLES", "WORDS", "VERBS", "ADJECTIVES", "NOUNS", "QUALIFIERS"):
        entries = getattr(synth, name)
        assert len(set(entries)) == len(entries), name
    assert len(synth.VERBS) * (len(synth.ADJECTIVES) + 1) * len(synth.NOUNS) * (len(synth.QUALIFIERS) + 1) > 4e6
    names = {synth.draw("exercises", 0, i)["name"] for i in range(1000)}
    assert len(names) > 990 and all(name.isidentifier() for name in names)
    textbooks = [synth.draw("textbook", 0, i) for i in range(1000)]
    assert len({c["subtopic"] for c in textbooks}) > 400 and len({c["audience"] for c in textbooks}) == len(
        synth.AUDIENCES)


GOOD = '''Sure:
```python
import math

def area(r: float) -> float:
    """The area of a circle.

    >>> area(1.0) == math.pi
    True
    >>> round(area(2.0), 2)
    12.57
    >>> print(area(0.0))
    0.0
    """
    return math.pi * r * r
```
Hope it helps.'''


@pytest.mark.parametrize("text, why", [
    (GOOD, None),
    (GOOD.replace("```python", "```").replace("Sure:", ""), None),
    ("    def area(r):\n        '''Doc.'''\n        return r\n", None),  # unfenced, indented
    (GOOD.replace("(r: float", "(r: float:"), "does not parse"),
    (GOOD.replace("def area", "def volume"), "named volume, not area"),
    (GOOD.replace("import math", "x = 1"), "not one function alone"),
    (GOOD.replace("    return math.pi * r * r\n", "    return 1\nprint(area(1))\n"), "not one function alone"),
    ("def area(r):\n    return r\n", "no docstring"),
    ("def area(r):\n    '''Doc.'''\n    ...\n", "no body"),
    ("def area(r):\n    '''Doc.'''\n    raise NotImplementedError\n", "no body"),
    ("def area(r):\n    '''Doc.'''\n    raise NotImplementedError('later')\n", "no body"),
    ("def area(r):\n    '''Doc.'''; return r\n", "docstring's line"),
    (GOOD.replace("```python", "```Python"), None),  # the language named as people write it
    ("Usage:\n```python\nprint(area(2.0))\n```\n" + GOOD, None),  # the block defining the function, not the first
])
def test_parse_exercise(text, why):
    if why is None:
        prompt, completion = synth.parse_exercise(text, "area")
        assert prompt.rstrip().endswith(('"""', "'''")) and completion.lstrip().startswith("return")
        assert prompt.startswith(("import math\n\ndef area", "def area"))
    else:
        with pytest.raises(synth.Invalid, match=why):
            synth.parse_exercise(text, "area")


@pytest.mark.parametrize("odd", ["\u2028", "\x0c", "\x1c", "\x85"])
def test_parse_exercise_ends_lines_where_python_does(odd):
    text = GOOD.replace("The area of a circle.", f"The area of a circle{odd}in the plane.").replace(
        "    return math.pi", f"    unit = '{odd}'\n    return math.pi")
    prompt, completion = synth.parse_exercise(text, "area")
    assert prompt + completion == synth.FENCE.search(text).group(1)
    assert completion == f"    unit = '{odd}'\n    return math.pi * r * r\n"
    assert synth.parse_exercise(text.replace("\n", "\r\n"), "area") == (prompt, completion)


def test_an_answer_whose_last_line_goes_on_past_the_function_is_invalid():
    """A "\\" onto a comment after the function: cut out, the function ended in "\\" and parsed no
    more, and checking its examples crashed the run, at the same item on every rerun."""
    text = ('```python\ndef f(a: int) -> int:\n    """Double.\n\n    >>> f(2)\n    4\n    """\n'
            '    return a * 2 \\\n# done\n```\n')
    with pytest.raises(synth.Invalid, match="does not parse without what follows it"):
        synth.parse_exercise(text, "f")
    assert synth.example_asserts('def f():\n    """>>> f()\n    1\n    """\n    return 1 \\\n') == ""


def test_code_too_deep_for_the_parser_or_with_a_null_byte_is_invalid():
    for body in ("1 + " * 100_000 + "1", "-" * 100_000 + "1", "[" * 10_000 + "]" * 10_000, "'\x00'"):
        with pytest.raises(synth.Invalid, match="does not parse"):
            synth.parse_exercise(f"def area(r):\n    '''Doc.'''\n    return {body}\n", "area")
    deep = "-" * 990 + "1"  # parses, but is too deep for ast.unparse
    assert synth.parse_exercise(f"def area(r):\n    '''Doc.'''\n    raise {deep}\n", "area")[1] == f"    raise {deep}\n"
    for want in ("-" * 100_000 + "1", "1 + " * 100_000 + "1"):  # in a docstring's example
        assert synth.example_asserts(f"def area(r):\n    '''Doc.\n\n    >>> area(1)\n    {want}\n    '''\n") == ""


def test_examples_become_asserts_and_run_in_the_sandbox(monkeypatch):
    prompt, completion = synth.parse_exercise(GOOD, "area")
    exercise = {"text": prompt + completion}
    assert synth.example_asserts(exercise["text"]).splitlines() == [
        "assert (area(1.0) == math.pi) == (True), 'area(1.0) == math.pi'",
        "assert (round(area(2.0), 2)) == (12.57), 'round(area(2.0), 2)'"]  # print(...) left out
    assert synth.check_examples(exercise, None) == "unchecked"
    assert synth.check_examples({"text": "def f():\n    'No examples.'\n    return 1\n"}, None) == "none"
    sandbox = synth.open_sandbox(1)
    if sandbox is not None:  # evaluate.py has one
        with sandbox:
            assert synth.check_examples(exercise, sandbox) == "passed"
            wrong = {"text": exercise["text"].replace("12.57", "12.5")}
            assert synth.check_examples(wrong, sandbox).startswith("failed: AssertionError")
    monkeypatch.setitem(sys.modules, "evaluate", None)  # evaluate.py missing
    assert synth.open_sandbox(1) is None


def test_dedup_exact_and_near_duplicates():
    import random
    rng = random.Random(0)
    words = [f"w{rng.randrange(5000)}" for _ in range(300)]
    text = " ".join(words)
    dedup = synth.Dedup(0.8)
    assert dedup.add("a", text) is None
    assert dedup.add("b", text.upper().replace(" ", "\n  ")) == "duplicate of a"
    close = words.copy()
    close[150] = "changed"
    assert dedup.add("c", " ".join(close)).startswith("near duplicate of a (similarity 0.9")
    assert dedup.add("d", " ".join(words[:150] + [f"v{rng.randrange(5000)}" for _ in range(150)])) is None
    assert dedup.add("e", " ".join(rng.sample(words, 300))) is None  # same words, other order
    assert (synth.Dedup(0.8).signature(text) == dedup.signature(text)).all()  # stable between runs
    many = synth.Dedup(0.8)
    assert all(many.add(str(i), " ".join(f"w{rng.randrange(10**6)}" for _ in range(50))) is None
               for i in range(3000))  # grows past its first allocation
    # a long answer's minima are taken a block of shingles at a time (a server ignoring max_tokens
    # made words x 128 at once: gigabytes), and are those of all of them at once
    long = [f"w{rng.randrange(10**6)}" for _ in range(10_000)]
    h = np.array([zlib.crc32(w.encode()) for w in long], np.uint64)
    shingles = np.zeros(len(h) - 4, np.uint64)
    for j in range(5):
        shingles = (shingles * np.uint64(1_000_003) + h[j:len(h) - 4 + j]) & dedup.MASK
    at_once = ((shingles[:, None] * dedup.A + dedup.B) % dedup.PRIME & dedup.MASK).min(axis=0)
    assert np.array_equal(dedup.signature(" ".join(long)), at_once.astype(np.uint32))


def test_dedup_finds_the_near_duplicates_a_comparison_with_every_record_finds():
    """At --near_dup=0.8 two texts that similar share a band (fewer than 32 of 128 values differ),
    so the index misses none: record by record, its verdicts are those of brute force."""
    import random
    rng = random.Random(1)
    bases = [[f"w{rng.randrange(3000)}" for _ in range(60)] for _ in range(20)]
    dedup, exact, kept, ids, verdicts = synth.Dedup(0.8), {}, [], [], Counter()
    for i in range(400):
        words = list(rng.choice(bases))
        for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 20])):  # similarities from 1 down to ~0.2
            words[rng.randrange(len(words))] = f"v{rng.randrange(10 ** 6)}"
        text, rid = " ".join(words), f"textbook-1-{i}"
        signature = dedup.signature(text)
        similarity = (np.array(kept) == signature).mean(axis=1) if kept else np.zeros(1)
        if text in exact:
            expected = f"duplicate of {exact[text]}"
        elif similarity.max() >= 0.8:
            best = int(similarity.argmax())
            expected = f"near duplicate of {ids[best]} (similarity {similarity[best]:.2f})"
        else:
            expected = None
            exact[text] = rid
            kept.append(signature)
            ids.append(rid)
        assert dedup.add(rid, text) == expected
        verdicts[(expected or "new").split(" of ")[0]] += 1
    assert min(verdicts.values()) > 10 and len(verdicts) == 3, verdicts  # new 323, near 59, exact 18


def test_dedup_holds_a_record_in_under_4_5_kb():
    """32 dicts of bytes keys and lists of one row took 6.8 KB a record (1.4 GB per 200K records;
    README's million, 7.7 GB); a number a band, and a row alone in place of a list, 3.4 KB."""
    import tracemalloc
    n = 3000
    signatures = np.random.default_rng(0).integers(0, 1 << 32, (n, 128), dtype=np.uint64).astype(np.uint32)
    tracemalloc.start()
    try:
        dedup = synth.Dedup(0.8)
        for i, signature in enumerate(signatures):
            assert dedup.add(f"textbook-1337-{i}", f"text {i}", signature) is None
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / n < 4500


def die(text):
    """A process signing records, killed (out of memory, say)."""
    os._exit(9)


def test_a_resume_signs_the_records_on_all_cores_as_one_core_does(tmp_path, monkeypatch):
    """One core signed every record before the first request: 25 minutes at README's million."""
    out = tmp_path / "t.jsonl"
    texts = [llm_server.prose(i, duplicates=False) for i in range(300)]
    out.write_text("".join(json.dumps({"id": f"textbook-1337-{i}", "text": text, "model": "teacher" if i % 3 else "fake"})
                           + "\n" for i, text in enumerate(texts)))
    monkeypatch.setattr(synth, "KNOWN_CHUNK", 64)  # a pool, for more than a chunk
    monkeypatch.setattr(synth.os, "sched_getaffinity", lambda pid: {0, 1})  # of two processes, on any machine
    dedup = synth.Dedup(0.8)
    assert synth.known(out, dedup, "fake", threading.Event()) == {"teacher": 200}
    alone = synth.Dedup(0.8)
    for i, text in enumerate(texts):
        alone.add(f"textbook-1337-{i}", text)
    assert dedup.ids == alone.ids and np.array_equal(dedup.signatures, alone.signatures)
    assert dedup.add("textbook-1337-300", texts[7] + " more").startswith("near duplicate of textbook-1337-7 ")
    stop = threading.Event()
    stop.set()  # Ctrl-C: the run makes no items, so none need be known
    assert synth.known(out, synth.Dedup(0.8), "fake", stop) == Counter()
    monkeypatch.setattr(synth.Dedup, "signature", die)
    with pytest.raises(UserError, match="a process signing the records of the output died .*run the command again"):
        synth.known(out, synth.Dedup(0.8), "fake", threading.Event())


def test_a_textbook_answer_with_crlf_line_ends_trains_without_carriage_returns():
    """Exercises were normalised, textbooks only stripped: a server sending CRLF put "\r" before
    every newline of the pretraining text."""
    text = "## Loops\r\n\r\n```python\r\nfor i in range(3):\r\n    print(i)\r\n```\r\n"
    assert synth.to_record("textbook", text, {}, None) == {"text": "## Loops\n\n```python\nfor i in range(3):\n"
                                                                  "    print(i)\n```"}


# ---------------------------------------------------------------- behaviours pinned by mutation testing

def distinct_prose(body):
    """Usable, distinct answers only (no duplicates), some slow: later items often finish first."""
    h = llm_server.digest(body)
    time.sleep(0.02 * (h % 4))
    return llm_server.prose(h, duplicates=False)


def test_every_usable_answer_is_written_in_index_order(tmp_path):
    out = tmp_path / "t.jsonl"
    with FakeLLM(answer=distinct_prose) as server:
        synthesize(server, "textbook", out, "--n=12")
    assert [r["id"] for r in records(out)] == [f"textbook-1337-{i}" for i in range(12)]
    assert not Path(f"{out}.skipped").exists()


def test_a_rerun_does_not_ask_again_for_items_judged_in_the_skipped_file(tmp_path):
    out = tmp_path / "t.jsonl"
    Path(f"{out}.skipped").write_text(json.dumps({"id": "textbook-1337-0", "reason": "invalid: empty answer"}) + "\n")
    with FakeLLM(answer=distinct_prose) as server:
        synthesize(server, "textbook", out, "--n=2")
        assert len(server.served) == 2
    assert [r["id"] for r in records(out)] == ["textbook-1337-1", "textbook-1337-2"]


def test_records_of_another_seed_do_not_count_towards_n(tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text("".join(json.dumps({"id": f"textbook-7-{i}", "text": f"other seed {i}"}) + "\n" for i in range(2)))
    with FakeLLM(answer=distinct_prose) as server:
        report = synthesize(server, "textbook", out, "--n=2")
    assert [r["id"] for r in records(out)] == ["textbook-7-0", "textbook-7-1", "textbook-1337-0", "textbook-1337-1"]
    assert report["run"]["written"] == 2


def test_an_answer_repeating_a_record_of_the_output_is_a_duplicate_on_a_rerun(tmp_path):
    """A rerun knew only the answers of its own run: it wrote a copy of a record already there."""
    out, kept = tmp_path / "t.jsonl", llm_server.prose(1, duplicates=False)
    out.write_text(json.dumps({"id": "textbook-1337-0", "text": kept, "model": "fake"}) + "\n")
    item_1 = synth.request_seed("textbook-1337-1", 0)
    with FakeLLM(answer=lambda body: kept if body["seed"] == item_1 else distinct_prose(body)) as server:
        synthesize(server, "textbook", out, "--n=2", "--concurrency=1")
    assert [r["id"] for r in records(out)] == ["textbook-1337-0", "textbook-1337-2"]
    assert [(s["id"], s["reason"]) for s in records(f"{out}.skipped")] == [
        ("textbook-1337-1", "duplicate of textbook-1337-0")]


def test_adding_to_records_of_another_model_says_so(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    out.write_text("".join(json.dumps({"id": f"textbook-1337-{i}", "text": f"theirs {i}", "model": "teacher"}) + "\n"
                           for i in range(2)))
    with FakeLLM(answer=distinct_prose) as server:
        synthesize(server, "textbook", out, "--n=3")
        assert "holds records of another --model (2 of teacher); this run adds fake's" in capsys.readouterr().err
        synthesize(server, "textbook", out, "--n=4")  # the file holds one of fake's now: the same two
        assert "(2 of teacher)" in capsys.readouterr().err
        synthesize(server, "textbook", out, "--n=4")  # nothing to add: nothing to say
        assert "another --model" not in capsys.readouterr().err
    assert [r["model"] for r in records(out)] == ["teacher"] * 2 + ["fake"] * 2


def test_each_answer_of_an_item_is_asked_for_with_a_new_seed():
    seeds = [synth.request_seed("exercises-1337-0", answers) for answers in range(4)]
    assert len(set(seeds)) == 4 and seeds[0] == synth.request_seed("exercises-1337-0", 0)
    assert synth.request_seed("exercises-1337-1", 0) != seeds[0]


@pytest.mark.parametrize("text, why", [
    ("def area(r):\n    '''Doc.'''\n    return r\n\ndef volume(r):\n    '''Doc.'''\n    return r\n",
     "not one function alone"),
    ("def helper(r):\n    return r\n\ndef area(r):\n    '''Doc.'''\n    return helper(r)\n", "not one function alone"),
    ("def area(r):\n    '''Doc.'''\n    pass\n", "no body"),
    ("def area(r):\n    '''Doc.'''\n", "no body"),  # the docstring alone
    ("def area(r):\n    '''Doc.'''\n    '''More doc.'''\n    0\n", "no body"),  # constants do nothing
])
def test_parse_exercise_rejects_other_functions_and_empty_bodies(text, why):
    with pytest.raises(synth.Invalid, match=why):
        synth.parse_exercise(text, "area")


def test_examples_without_a_result_run_as_they_are():
    code = "def f(x):\n    '''Doc.\n\n    >>> y = f(1)\n    >>> y\n    2\n    '''\n    return x + 1\n"
    assert synth.example_asserts(code).splitlines() == ["y = f(1)", "assert (y) == (2), 'y'"]


def test_examples_with_comments_become_asserts_that_compile():
    code = ("def double(x):\n    '''Doc.\n\n    >>> double(2)  # two, doubled\n    4  # four\n"
            "    >>> double(\n    ...     3)\n    6\n    '''\n    return 2 * x\n")
    asserts = synth.example_asserts(code)
    assert asserts.splitlines() == ["assert (double(2)) == (4), 'double(2)  # two, doubled'",
                                    "assert (double(3)) == (6), 'double(\\n    3)'"]
    exec(compile(code + asserts, "<exercise>", "exec"), {})


def test_a_textbook_record_is_the_answer_stripped():
    assert synth.to_record("textbook", "\n\n  # Loops\n\nText.  \n\n", {}, None) == {"text": "# Loops\n\nText."}
    with pytest.raises(synth.Invalid, match="empty answer"):
        synth.to_record("textbook", " \n\t", {}, None)


def test_near_dup_threshold_is_inclusive_and_ignores_case():
    words = " ".join(f"w{i}" for i in range(40))
    dedup = synth.Dedup(1.0)  # only an estimated similarity of 1 is a near duplicate
    assert dedup.add("a", words) is None
    assert dedup.add("b", words.replace(" ", ", ")) == "near duplicate of a (similarity 1.00)"  # not exact: commas
    assert dedup.add("c", words.upper().replace(" ", "; ")).startswith("near duplicate of a")


def test_short_texts_and_a_texts_last_words_are_shingled():
    """Texts of 5 words or fewer had no shingle, so one signature: each a near duplicate of the
    first; and the last 5 words of a text were left out of its signature."""
    dedup = synth.Dedup(0.8)
    assert dedup.add("a", "loops repeat things") is None
    assert dedup.add("b", "functions return values") is None
    assert dedup.add("c", "w1 w2 w3 w4 w5 w6") is None
    assert dedup.add("d", "w1 w2 w3 w4 w5 other") is None  # 1 of 3 distinct 5-grams shared


@pytest.mark.parametrize("near_dup, ok", [(0.0, False), (-0.1, False), (1.0, True), (1.01, False), (0.5, True)])
def test_near_dup_setting_must_be_in_zero_one(near_dup, ok):
    cfg, _ = synth.parse_args(synth.DEFAULTS, synth.__doc__, ["textbook", "--model=fake", f"--near_dup={near_dup}"])
    if ok:
        synth.check_settings(cfg)
    else:
        with pytest.raises(UserError, match="--near_dup must be in"):
            synth.check_settings(cfg)


def test_diversity_counts_only_judged_drops_of_its_own_kind(tmp_path):
    out, skipped = tmp_path / "t.jsonl", tmp_path / "t.jsonl.skipped"
    out.write_text("".join(json.dumps({"id": f"textbook-1-{i}", "text": f"text {i}",
                                       "constraints": synth.draw("textbook", 1, i)}) + "\n" for i in range(5)))
    reasons = {"textbook-1-5": "duplicate of textbook-1-0", "textbook-1-6": "near duplicate of textbook-1-1 (0.9)",
               "textbook-1-7": "near duplicate of textbook-1-2 (0.9)", "textbook-1-8": "invalid: empty answer",
               "textbook-1-9": "request failed: server 500", "exercises-1-0": "near duplicate of exercises-1-1 (1.0)",
               "exercises-1-2": "duplicate of exercises-1-3"}
    skipped.write_text("".join(json.dumps({"id": k, "reason": v}) + "\n" for k, v in reasons.items()))
    report = synth.diversity("textbook", out, skipped)
    assert report["records"] == 5
    assert report["dropped"] == {"duplicate": 1, "near duplicate": 2, "given up": 1}
    assert report["duplicate_rate"] == round(3 / 8, 4)  # exact and near duplicates, of them and the records


def test_refusals_that_differ_are_each_about_their_own_item(tmp_path):
    out = tmp_path / "t.jsonl"  # "filtered": each refusal names, in words, what its own request asked
    with FakeLLM(faults=["filtered"] * 6 + ["ok"] * 100, answer=distinct_prose) as server:
        report = synthesize(server, "textbook", out, "--n=2", "--concurrency=1")
    assert [s["id"] for s in records(f"{out}.skipped")] == [f"textbook-1337-{i}" for i in range(6)]
    assert [r["id"] for r in records(out)] == ["textbook-1337-6", "textbook-1337-7"]
    assert report["dropped"]["given up"] == 6


def test_an_item_asks_again_with_a_new_seed_after_each_unusable_answer():
    from types import SimpleNamespace

    class Client:  # the first answers are unusable: empty
        def __init__(self):
            self.seeds = []

        def chat(self, messages, temperature, max_tokens, seed):
            self.seeds.append(seed)
            return SimpleNamespace(text="" if len(self.seeds) < 3 else "A usable section.", finish_reason="stop")

    cfg = SimpleNamespace(seed=1337, attempts=3, temperature=1.0, max_tokens=100, model="fake")
    client = Client()
    outcome = synth.make_item("textbook", 4, cfg, client, synth.Dedup(0.8), None, threading.Event())
    assert outcome.record["id"] == "textbook-1337-4" and outcome.invalid == 2
    assert client.seeds == [synth.request_seed("textbook-1337-4", answers) for answers in range(3)]


def test_a_stop_between_attempts_asks_no_more_and_writes_nothing_after_the_item(tmp_path):
    """Item 0's answer is unusable and comes after a stop: it is not asked for again (its --attempts
    ran on, minutes against a trickling endpoint), and neither it nor item 1 after it is written or
    judged, so a rerun asks for both in order."""
    stop, item_1 = threading.Event(), synth.request_seed("textbook-1337-1", 0)

    def answer(body):  # item 1 gets a record and meanwhile a stop comes; then item 0 an unusable answer
        if body["seed"] == item_1:
            stop.set()
            return distinct_prose(body)
        stop.wait(5)
        return "  "

    out = tmp_path / "t.jsonl"
    cfg, _ = synth.parse_args(synth.DEFAULTS, argv=["--model=fake", "--n=2", "--concurrency=2", "--attempts=3"])
    with FakeLLM(answer=answer) as server, llm.Client(server.url, "fake") as client:
        counts, error = synth.synthesize("textbook", cfg, client, synth.Dedup(0.8), None, Appender(out),
                                         Appender(Path(f"{out}.skipped")), 0, set(), stop)
        assert server.served == ["ok", "ok"]
    assert (counts["written"], error) == (0, None)
    assert not out.exists() and not Path(f"{out}.skipped").exists()


def test_coverage_counts_only_the_constraints_an_item_drew():
    c = {**synth.draw("exercises", 0, 0), "adjective": "", "qualifier": ""}
    assert synth.used("exercises", c) == {"subtopics": [(c["area"], c["topic"], c["subtopic"])], "verbs": [c["verb"]],
                                          "nouns": [c["noun"]], "adjectives": [], "qualifiers": []}


def test_an_output_of_another_kind_is_refused_before_any_request(tmp_path):
    """Textbooks appended to exercises, and the report adding up both kinds' costs."""
    out = tmp_path / "ex.jsonl"
    out.write_text(json.dumps({"id": "exercises-1337-0", "text": "def f():\n    pass\n"}) + "\n")
    before = out.read_bytes()
    with FakeLLM(answer=distinct_prose) as server:
        with pytest.raises(UserError, match=f"^{out} holds exercises records \\(exercises-1337-0\\), not textbook"):
            synthesize(server, "textbook", out, "--n=5")
        assert server.served == []
    assert out.read_bytes() == before and not Path(f"{out}.report.json").exists()


@pytest.mark.parametrize("out", [".", "/", "folder"])
def test_an_out_that_is_a_folder_is_one_line(tmp_path, monkeypatch, out):
    """--out=. and --out=/ were a traceback (a path without a file name)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=f"--out={out} is a folder: name the JSONL file to write"):
        synth.main(["textbook", "--n=1", f"--out={out}", "--api_base=http://127.0.0.1:9/v1"])


@pytest.mark.parametrize("record", [{"id": "web-3", "text": "def f(): pass"}, {"text": "no id"}])
def test_an_output_holding_records_synth_did_not_write_is_refused_before_any_request(tmp_path, record):
    out = tmp_path / "docs.jsonl"  # a corpus or annotations, given as --out by mistake
    out.write_text(json.dumps(record) + "\n")
    with FakeLLM(answer=distinct_prose) as server:
        with pytest.raises(UserError, match=f"^{out} holds records synth.py did not write \\(id '"):
            synthesize(server, "textbook", out, "--n=2")
        assert server.served == []
    assert out.read_text() == json.dumps(record) + "\n"
