"""llm.py against a local fake OpenAI-compatible server: replies, retries, limits, failures."""

import contextlib
import email.utils
import json
import signal
import socket
import struct
import threading
import time

import pytest
import requests

import llm
from llm_server import FakeLLM, answer

MESSAGES = [{"role": "user", "content": "Tell me about loops."}]


def client_for(server, **kw):
    return llm.Client(server.url, "fake", **{"backoff": 0.01, "timeout": 0.5, **kw})


def test_no_descriptor_left_for_a_body_is_a_connection_failure_retried(monkeypatch):
    """The body's watchdog takes a descriptor of its own: at the limit on open files (ulimit -n),
    os.dup's OSError came out of map() as a crash (synth.py: "a bug")."""
    real, calls = llm.os.dup, []

    def dup(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return real(fd)
    monkeypatch.setattr(llm.os, "dup", dup)
    with FakeLLM() as server, client_for(server) as client:
        assert client.chat(MESSAGES).text
        assert (client.stats.requests, client.stats.retries, dict(client.stats.errors)) == (2, 1, {"connection": 1})


def test_chat_returns_text_usage_and_cost():
    with FakeLLM() as server, client_for(server, price_in=2.0, price_out=10.0) as client:
        reply = client.chat(MESSAGES, max_tokens=50, temperature=0.5, seed=None)  # None: left out
        assert reply.text == answer({"model": "fake", "messages": MESSAGES, "max_tokens": 50, "temperature": 0.5})
        assert reply.finish_reason == "stop" and reply.usage["completion_tokens"] == len(reply.text) // 4
        s = client.stats
        assert (s.requests, s.retries, s.tokens_in, s.tokens_out) == (1, 0, reply.usage["prompt_tokens"],
                                                                      reply.usage["completion_tokens"])
        assert s.cost == pytest.approx((2.0 * s.tokens_in + 10.0 * s.tokens_out) / 1e6)


def test_complete_uses_the_completions_route():
    with FakeLLM() as server, client_for(server) as client:
        assert client.complete("def f(x):", max_tokens=8).text == answer({"model": "fake", "prompt": "def f(x):",
                                                                          "max_tokens": 8})


def test_params_given_as_none_are_left_out_of_the_body():
    """None means the server's own default: it was sent as null ("seed": null)."""
    bodies = []
    with FakeLLM(answer=lambda body: bodies.append(body) or answer(body)) as server, client_for(server) as client:
        client.chat(MESSAGES, max_tokens=5, seed=None)
        client.complete("def f(x):", seed=None, temperature=None)
    assert [sorted(body) for body in bodies] == [["max_tokens", "messages", "model"], ["model", "prompt"]]


def test_endpoint_and_key_from_the_environment(monkeypatch):
    with FakeLLM(key="sekrit") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
        assert llm.Client(model="fake").chat(MESSAGES).text
        monkeypatch.delenv("OPENAI_API_KEY")
        client = llm.Client(model="fake")
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        failure = error.value.failure
        assert (failure.kind, failure.status, failure.fatal, failure.attempts) == ("refused", 401, True, 1)
        assert "Incorrect API key" in failure.message and client.stats.requests == 1


@pytest.mark.parametrize("fault, kind", [("429", "rate_limit"), ("500", "server"), ("503", "server"), ("408", "server"),
                                         ("slow", "timeout"), ("malformed", "bad_response"), ("html", "bad_response"),
                                         ("empty", "bad_response"), ("drop", "connection"), ("cut", "connection")])
def test_a_failed_attempt_is_retried(fault, kind):
    with FakeLLM(faults=[fault, "ok"], slow=1.0) as server, client_for(server, timeout=0.3) as client:
        assert client.chat(MESSAGES).text == answer({"model": "fake", "messages": MESSAGES})
        s = client.stats
        assert (s.requests, s.retries, dict(s.errors), dict(s.failures)) == (2, 1, {kind: 1}, {})


def test_retry_after_is_honoured_and_holds_other_requests():
    with FakeLLM(faults=["429", "ok", "ok"], retry_after="0.4") as server, client_for(server, backoff=0) as client:
        started = time.monotonic()
        first = threading.Thread(target=client.chat, args=(MESSAGES,))
        first.start()
        time.sleep(0.1)
        client.chat(MESSAGES)  # starts only once the 429's pause is over
        held = time.monotonic() - started  # measured before join: this request itself was held
        first.join()
        assert held >= 0.4


def test_a_retry_after_longer_than_max_backoff_is_cut_to_it():
    with FakeLLM(faults=["429", "ok"], retry_after="30") as server, \
            client_for(server, max_backoff=0.2) as client:
        started = time.monotonic()
        assert client.chat(MESSAGES).text
        assert time.monotonic() - started < 2  # the pause: max_backoff 0.2 s times at most 1.2


def test_retry_after_header_forms():
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert llm._retry_after({"retry-after": "2"}) == 2.0
    assert llm._retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert 28 < llm._retry_after({"retry-after": future}) <= 30
    assert llm._retry_after({"retry-after": "soon"}) is None and llm._retry_after({}) is None


def test_gives_up_after_max_retries():
    with FakeLLM(faults=["500"]) as server, client_for(server, max_retries=2) as client:
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        failure = error.value.failure
        assert (failure.kind, failure.attempts, failure.fatal) == ("server", 3, False)
        s = client.stats
        assert (s.requests, s.retries, dict(s.failures)) == (3, 2, {"server": 1})


def test_an_answer_without_text_is_refused_not_retried():
    """content null (a refusal, a content filter) was retried as a malformed reply, and every rerun asked again."""
    with FakeLLM(faults=["null"]) as server, client_for(server) as client:
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        failure = error.value.failure
        assert (failure.kind, failure.status, failure.fatal, failure.attempts) == ("refused", 200, False, 1)
        assert "content_filter" in failure.message and client.stats.requests == 1
        assert (client.stats.tokens_in, client.stats.no_usage) == (len(json.dumps(MESSAGES)) // 4, 0)  # billed


def test_a_reply_that_cannot_be_read_still_counts_the_usage_it_reports():
    """Retried as a bad response, its tokens were dropped: a server that answers so each
    time bills every retry, and the run's cost said none of it."""
    with FakeLLM(faults=["empty", "empty", "ok"]) as server, client_for(server, price_in=1e6, price_out=1e6) as client:
        reply = client.chat(MESSAGES)
        s = client.stats
        assert (s.requests, s.retries, s.tokens_in, s.tokens_out) == (
            3, 2, 2 * 7 + reply.usage["prompt_tokens"], 2 * 3 + reply.usage["completion_tokens"])
        assert s.cost == pytest.approx(s.tokens_in + s.tokens_out)


def test_a_long_retry_chain_and_a_json_nested_too_deep_are_failures_not_tracebacks():
    with FakeLLM(faults=["500"]) as server, client_for(server, backoff=0.0, max_retries=1100) as client:
        with pytest.raises(llm.LLMError, match="server 500"):  # 2 ** 1024 is no float
            client.chat(MESSAGES)
    with FakeLLM(faults=["nested"]) as server, client_for(server, max_retries=0) as client:
        with pytest.raises(llm.LLMError, match="bad_response 200: not an answer \\(RecursionError"):
            client.chat(MESSAGES)


def test_setting_stop_cuts_a_backoff_short():
    """A Retry-After: 20 held a thread outside map() for 20 s or more after its caller's Ctrl-C."""
    with FakeLLM(faults=["429"], retry_after="20") as server, client_for(server, max_backoff=60) as client:
        threading.Timer(0.3, client.stop.set).start()
        started = time.monotonic()
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        assert error.value.failure.kind == "stopped" and time.monotonic() - started < 2
        assert server.served == ["429"]


@pytest.mark.parametrize("model, params, status, fatal", [("fake", {"max_tokens": 0}, 400, False),
                                                          ("gpt-9", {}, 404, True)])
def test_other_client_errors_are_not_retried(model, params, status, fatal):
    with FakeLLM() as server:
        client = llm.Client(server.url, model, backoff=0.01)
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES, **params)
        failure = error.value.failure
        assert (failure.kind, failure.status, failure.fatal, client.stats.requests) == ("refused", status, fatal, 1)
        assert failure.message.startswith(("max_tokens must be", "The model `gpt-9` does not exist"))


def test_map_yields_every_request_with_bounded_concurrency():
    with FakeLLM(faults=["ok"] * 9 + ["500"], latency=0.05) as server, client_for(server, concurrency=3) as client:
        items = [(i, [{"role": "user", "content": f"question {i}"}]) for i in range(20)]
        items += [("prompt", "def f():"), ("refused", [{"role": "user", "content": "x"}])]
        results = dict(client.map(iter(items), max_tokens=5))
        assert set(results) == {key for key, _ in items}
        assert all(isinstance(r, llm.Reply) for key, r in results.items() if key != "refused")
        assert server.most_in_flight == 3
        assert results["prompt"].text == answer({"model": "fake", "prompt": "def f():", "max_tokens": 5})


def test_map_yields_failures():
    with FakeLLM() as server, client_for(server) as client:
        (key, result), = client.map([("a", MESSAGES)], max_tokens=0)
        assert key == "a" and isinstance(result, llm.Failure) and result.status == 400


def test_an_items_own_params_win_over_those_of_map():
    with FakeLLM() as server, client_for(server) as client:
        results = dict(client.map([("own", MESSAGES, {"seed": 5}), ("map's", MESSAGES)], seed=1, max_tokens=5))
    assert results["own"].text == answer({"model": "fake", "messages": MESSAGES, "seed": 5, "max_tokens": 5})
    assert results["map's"].text == answer({"model": "fake", "messages": MESSAGES, "seed": 1, "max_tokens": 5})
    assert results["own"].text != results["map's"].text  # the seed tells them apart


@pytest.fixture
def sessions(monkeypatch):
    """The requests.Sessions made during the test, and those of them still open."""
    made, still_open = [], set()

    class Session(requests.Session):
        def __init__(self):
            super().__init__()
            made.append(self)
            still_open.add(self)

        def close(self):
            still_open.discard(self)
            super().close()

    monkeypatch.setattr(requests, "Session", Session)
    return made, still_open


def eventually(condition, seconds=2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_ctrl_c_in_map_returns_at_once():
    """Ctrl-C while map() waits for answers that take 10 s: it raises at once, and the
    requests still queued are never sent."""
    signalled = []

    def interrupt():
        eventually(lambda: server.in_flight == 2)
        signalled.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    with FakeLLM(faults=["slow"], slow=10) as server, client_for(server, timeout=60, concurrency=2) as client:
        threading.Thread(target=interrupt).start()
        with pytest.raises(KeyboardInterrupt):
            list(client.map((i, MESSAGES) for i in range(5)))
        assert time.monotonic() - signalled[0] < 1 and server.served == ["slow", "slow"]


def test_leaving_map_early_stops_its_retries(sessions):
    """A request in a 15 s backoff when the caller stops reading map(): map returns at once,
    and its thread leaves the backoff and closes its session without asking again."""
    _, still_open = sessions
    with FakeLLM(faults=["ok", "500"]) as server, client_for(server, backoff=30, concurrency=2) as client:
        results = client.map((i, MESSAGES) for i in range(2))
        next(results)  # the answer; the other request got a 500 and waits to retry
        assert eventually(lambda: client.stats.retries == 1)
        started = time.monotonic()
        results.close()
        assert time.monotonic() - started < 0.5
        assert eventually(lambda: not still_open) and server.served == ["ok", "500"]


def test_map_closes_its_sessions(sessions):
    made, still_open = sessions
    with FakeLLM() as server, client_for(server, concurrency=4) as client:
        for _ in range(20):
            assert len(list(client.map((i, MESSAGES) for i in range(8)))) == 8
        assert len(made) >= 20 and not still_open


@pytest.mark.parametrize("api_base", ["http://localhost:abc/v1", "http://[::1/v1", "http://a..b/v1"])
def test_a_malformed_url_fails_at_once(api_base):
    client = llm.Client(api_base, "fake", backoff=0.01)
    with pytest.raises(llm.LLMError) as error:
        client.chat(MESSAGES)
    failure = error.value.failure
    assert (failure.fatal, failure.attempts, client.stats.retries) == (True, 1, 0)
    assert f"{api_base}/chat/completions" in failure.message
    with pytest.raises(llm.LLMError, match="cannot reach"):
        client.check()


def test_a_404_names_the_url_and_asks_about_v1():
    with FakeLLM() as server:
        base = server.url.removesuffix("/v1")
        client = llm.Client(base, "fake")
        client.check()  # a 404 for /models: a server without one passes
        with pytest.raises(llm.LLMError) as error:
            client.complete("def f():")
        failure = error.value.failure
        assert (failure.status, failure.fatal, client.stats.requests) == (404, True, 1)
        assert f"POST {base}/completions: does --api_base end in /v1?" in failure.message
        with pytest.raises(llm.LLMError) as error:
            llm.Client(server.url, "gpt-9").complete("def f():")
        assert error.value.failure.message == ("The model `gpt-9` does not exist "
                                               f"(POST {server.url}/completions)")


def test_requests_per_minute_limit():
    with FakeLLM() as server, client_for(server, rpm=600, concurrency=8) as client:  # 10/s, 10 at once
        started = time.monotonic()
        assert len(list(client.map((i, MESSAGES) for i in range(15)))) == 15
        assert time.monotonic() - started >= 0.4  # 5 beyond the first second's worth, 0.1 s apart


def test_token_bucket_waits_and_lends():
    bucket = llm._Bucket(per_minute=600)  # 10 a second, 10 saved up at most
    now = bucket.time
    assert bucket.take(4, now) == 0 and bucket.take(6, now) == 0
    assert bucket.take(5, now) == pytest.approx(0.5)  # after a second's worth
    assert bucket.take(30, now + 1.0) == pytest.approx(0.5)  # more than it holds: waits for a full bucket
    bucket.give(100)
    assert bucket.level == bucket.capacity == 10


def test_check_finds_unreachable_refusing_and_modelless_endpoints():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(llm.LLMError, match=f"cannot reach http://127.0.0.1:{port}/v1: Connection refused"):
        llm.Client(f"http://127.0.0.1:{port}/v1", "fake").check()
    with FakeLLM(key="sekrit") as server:
        with pytest.raises(llm.LLMError, match="refused the API key"):
            llm.Client(server.url, "fake", api_key="wrong").check()
        llm.Client(server.url, "fake", api_key="sekrit").check()
        with pytest.raises(llm.LLMError, match="has no model 'gpt-9' \\(it lists fake\\)"):
            llm.Client(server.url, "gpt-9", api_key="sekrit").check()
    with pytest.raises(ValueError, match="http"):
        llm.Client("localhost:8000/v1", "fake")


def test_client_from_command_line_settings():
    from config import UserError, parse_args
    cfg, _ = parse_args(llm.DEFAULTS, argv=["--api_base=http://127.0.0.1:9/v1", "--concurrency=3", "--rpm=60"])
    client = llm.client_from(cfg, "some-model")
    assert (client.api_base, client.model, client.concurrency) == ("http://127.0.0.1:9/v1", "some-model", 3)
    for argv, message in [(["--concurrency=0"], "--concurrency must be from 1 to 1024"),
                          (["--concurrency=100000"], "--concurrency must be from 1 to 1024"),
                          (["--tpm=-1"], "--rpm and --tpm"),
                          (["--price_out=-2"], "--price_in and --price_out"),
                          (["--api_base=ftp://example.com"], "http:// or https://")]:
        cfg, _ = parse_args(llm.DEFAULTS, argv=argv)
        with pytest.raises(UserError, match=message):
            llm.client_from(cfg, "some-model")


class RecordedWaits(threading.Event):
    """Stands in for a client's stop (what chat() waits on): records each pause and returns at once."""

    def __init__(self):
        super().__init__()
        self.pauses = []

    def wait(self, timeout=None):
        self.pauses.append(timeout)
        return False


@pytest.fixture
def waits(monkeypatch):
    """The pauses of the clients made in the test, which do not wait."""
    recorded, init = RecordedWaits(), llm.Client.__init__

    def patched(self, *args, **kw):
        init(self, *args, **kw)
        self.stop = recorded

    monkeypatch.setattr(llm.Client, "__init__", patched)
    return recorded.pauses


@pytest.fixture
def extra_faults(monkeypatch):
    """FakeLLM faults beyond its own: "409", "quota" (429 for exhausted quota), "odd_usage" (usage counts that
    are not integers), "trickle" (a 200 whose body comes a byte every 0.1 s, for 5 s), "reset" (a 200 whose
    connection is reset half-way through the body)."""
    import llm_server
    respond = llm_server.Handler.respond

    def patched(self, fault, body):
        if fault == "trickle":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(50):
                    self.wfile.write(b" ")
                    time.sleep(0.1)
            except OSError:  # the client gave up
                pass
            return
        if fault == "reset":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"choices": [')
            self.wfile.flush()
            # a linger of 0 s: close() sends a reset (RST), not the end of the stream (FIN)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        if fault == "409":
            return self.error(409, "Conflict.", "conflict")
        if fault == "quota":
            return self.error(429, "You exceeded your current quota.", "insufficient_quota")
        if fault == "odd_usage":
            return self.send(200, {"choices": [{"message": {"content": "hi"}}],
                                   "usage": {"prompt_tokens": "12", "completion_tokens": 3.5}})
        return respond(self, fault, body)

    monkeypatch.setattr(llm_server.Handler, "respond", patched)


def test_backoff_doubles_up_to_max_backoff_jittered_down_to_half(waits, monkeypatch):
    with FakeLLM(faults=["500"] * 4 + ["ok"]) as server, \
            client_for(server, backoff=1.0, max_backoff=3.0, max_retries=4) as client:
        monkeypatch.setattr(llm.random, "uniform", lambda low, high: low)
        client.chat(MESSAGES)
        monkeypatch.setattr(llm.random, "uniform", lambda low, high: high)
        client.chat(MESSAGES)
    assert waits == [0.5, 1.0, 1.5, 1.5, 1.0, 2.0, 3.0, 3.0]


def test_a_429_holds_later_requests_until_its_longest_pause(waits, monkeypatch):
    monkeypatch.setattr(llm.random, "uniform", lambda low, high: high)
    with FakeLLM(faults=["429", "ok"], retry_after="20") as server, client_for(server, max_backoff=60) as client:
        client.chat(MESSAGES)  # the pause asked for, jittered up by a fifth; then held until it is over
        assert waits[0] == pytest.approx(24) and waits[1] == pytest.approx(24, abs=0.5)
        server.retry_after = "1"
        client.chat(MESSAGES)  # held by the first 429; a shorter one later does not shorten the hold
        assert waits[2] == pytest.approx(24, abs=0.5) and waits[3] == pytest.approx(1.2)
        assert waits[4] == pytest.approx(24, abs=0.5)


def test_requests_held_by_a_429_start_at_the_rate_limit_when_it_ends(waits, monkeypatch):
    """All held requests started together when the pause ended, whatever --rpm said."""
    clock = [1000.0]
    monkeypatch.setattr(llm.time, "monotonic", lambda: clock[0])
    with FakeLLM() as server, client_for(server, rpm=60) as client:  # a request a second, one saved up
        client._resume_at = clock[0] + 5  # as a 429 asking for 5 s leaves it
        for _ in range(3):
            client._wait_turn(1, client.stop)
    assert waits == pytest.approx([5, 6, 7])  # were [5, 5, 5]


def test_tokens_per_minute_charges_the_usage_reported_not_the_estimate(waits):
    with FakeLLM() as server, client_for(server, tpm=600) as client:  # 10 tokens a second, 10 saved up
        used = sum(client.chat(MESSAGES, max_tokens=900).usage.values())  # far beyond the bucket: no wait
        client.chat(MESSAGES, max_tokens=900)  # waits for the tokens the first one used, not its 900+
    assert len(waits) == 1 and waits[0] == pytest.approx(used / 10, abs=0.2)


def test_a_reply_without_usage_leaves_the_token_estimate_charged(waits, extra_faults):
    with FakeLLM(faults=["no_usage"]) as server, client_for(server, tpm=600) as client:
        estimate = len(llm.json.dumps(MESSAGES)) / 4 + 900
        client.chat(MESSAGES, max_tokens=900)
        client.chat(MESSAGES, max_tokens=900)
    assert len(waits) == 1 and waits[0] == pytest.approx(estimate / 10, abs=0.2)


@pytest.mark.parametrize("fault, why", [("reset", "Connection reset by peer"),
                                        ("cut", "the reply was cut short (13 bytes read, 987 more expected)")])
def test_a_connection_broken_mid_reply_is_named_in_plain_words(extra_faults, fault, why):
    """The reason read as requests' raw tuple: ("Connection broken: ConnectionResetError(104, ...)", ...)."""
    with FakeLLM(faults=[fault]) as server, client_for(server, max_retries=0) as client:
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        assert str(error.value) == f"connection: {why}"


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_a_reply_past_max_reply_fails_unretried_naming_the_limit(monkeypatch, encoding):
    """Kept whole, a 100 MB answer was taken, one without end grew to 8 GB in 30 s, and a 2 MB gzip
    bomb (2 GB unpacked) took 4 GB and was asked for again."""
    import gzip
    import llm_server
    monkeypatch.setattr(llm, "MAX_REPLY", 1 << 20)
    body = json.dumps({"data": [{"id": "fake"}], "choices": [{"message": {"content": "x" * (2 << 20)}}]}).encode()

    def huge(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if encoding == "gzip":  # 2 MiB in 2 KiB
            return self.send(200, gzip.compress(body), [("Content-Encoding", "gzip")])
        self.send(200, body)

    monkeypatch.setattr(llm_server.Handler, "do_POST", huge)
    monkeypatch.setattr(llm_server.Handler, "do_GET", huge)
    with FakeLLM() as server, client_for(server) as client:
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        failure = error.value.failure
        assert (failure.kind, failure.attempts, client.stats.requests) == ("bad_response", 1, 1)
        assert failure.message == f"{server.url}/chat/completions sent more than 1 MiB, which no answer comes near"
        with pytest.raises(llm.LLMError, match="/models sent more than 1 MiB"):
            client.check()


def test_a_409_is_retried(extra_faults):
    with FakeLLM(faults=["409", "ok"]) as server, client_for(server) as client:
        assert client.chat(MESSAGES).text
        assert (client.stats.retries, dict(client.stats.errors)) == (1, {"server": 1})


def test_an_answer_that_trickles_in_times_out_and_is_retried(extra_faults):
    """requests' read timeout bounds only the wait for each next byte: the whole answer must come within timeout."""
    with FakeLLM(faults=["trickle", "ok"]) as server, client_for(server, timeout=1) as client:
        started = time.monotonic()
        assert client.complete("def f():").text
        assert time.monotonic() - started < 2
        assert (client.stats.retries, dict(client.stats.errors)) == (1, {"timeout": 1})


def test_check_times_out_on_a_models_list_that_trickles_in(monkeypatch):
    import llm_server

    def trickle(self):
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up
            for _ in range(50):
                self.wfile.write(b" ")
                time.sleep(0.1)

    monkeypatch.setattr(llm_server.Handler, "do_GET", trickle)
    with FakeLLM() as server, client_for(server, timeout=1) as client:
        started = time.monotonic()
        with pytest.raises(llm.LLMError, match="did not answer within 1 s"):
            client.check()
        assert time.monotonic() - started < 2.5


def test_a_429_for_exhausted_quota_is_fatal_and_not_retried(extra_faults):
    with FakeLLM(faults=["quota"]) as server, client_for(server) as client:
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        failure = error.value.failure
        assert (failure.kind, failure.status, failure.fatal, failure.attempts) == ("refused", 429, True, 1)
        assert client.stats.requests == 1 and "exceeded your current quota" in failure.message


def test_concurrency_bounds_requests_from_the_callers_own_threads():
    with FakeLLM(latency=0.1) as server, client_for(server, concurrency=2) as client:
        threads = [threading.Thread(target=client.chat, args=(MESSAGES,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.most_in_flight == 2 and client.stats.requests == 6


def test_a_thread_map_cannot_start_is_one_line_naming_concurrency(monkeypatch):
    """"RuntimeError: can't start new thread" came out as a traceback."""
    from config import UserError
    start, started = threading.Thread.start, []

    def two_at_most(self):  # map's threads: the server's own start as ever
        if self.name == "llm":
            started.append(self)
            if len(started) > 2:
                raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", two_at_most)
    with FakeLLM(latency=0.1) as server, client_for(server, concurrency=4) as client:
        with pytest.raises(UserError, match=r"^cannot start thread 3 of --concurrency=4 \(can't start new thread\): "
                                            r"lower it$"):
            list(client.map((i, MESSAGES) for i in range(8)))


def test_map_reads_its_requests_lazily():
    read = []

    def items():
        for i in range(100):
            read.append(i)
            yield i, MESSAGES

    with FakeLLM() as server, client_for(server, concurrency=2) as client:
        results = client.map(items())
        next(results)
        assert len(read) <= 2 * 2 + 1
        results.close()


def test_a_key_with_a_pasted_newline_still_works():
    with FakeLLM(key="sekrit") as server:
        assert llm.Client(server.url, "fake", api_key="sekrit\n").chat(MESSAGES).text


@pytest.mark.parametrize("key", ["sk-ab\ncd", "sk-\x1b[0mab", "sk-\u200bab", "sk-\U0001f642"])
def test_a_key_no_header_can_carry_is_named_before_any_request(monkeypatch, key):
    """Sent, such a key failed as "cannot send to <url>", which blamed the URL."""
    with pytest.raises(ValueError, match=r"the API key holds .* at character \d+, which an HTTP header cannot carry"):
        llm.Client("http://127.0.0.1:9/v1", "fake", api_key=key)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with pytest.raises(ValueError, match=r"^\$OPENAI_API_KEY holds"):
        llm.Client("http://127.0.0.1:9/v1", "fake")


def test_negative_max_retries_is_refused():
    with pytest.raises(ValueError, match="max_retries >= 0"):
        llm.Client("http://127.0.0.1:9/v1", "fake", max_retries=-1)


def test_a_retry_after_in_the_past_is_no_wait():
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert llm._retry_after({"retry-after": past}) == 0.0 and llm._retry_after({"retry-after": "-5"}) == 0.0


def test_server_messages_are_one_line():
    r = requests.Response()
    r.status_code, r.reason = 400, "Bad Request"
    r._content = b'{"error": {"message": "max_tokens\\n   is too   large"}}'
    assert llm._server_message(r) == "max_tokens is too large"


def test_client_from_passes_every_setting():
    from config import UserError, parse_args
    cfg, _ = parse_args(llm.DEFAULTS, argv=["--api_base=http://127.0.0.1:9/v1", "--rpm=120", "--tpm=600",
                                            "--timeout=5", "--max_retries=2", "--backoff=0.5",
                                            "--price_in=1.5", "--price_out=4"])
    client = llm.client_from(cfg, "m")
    assert (client.timeout, client.max_retries, client.backoff, client.price_in, client.price_out) == (5, 2, 0.5,
                                                                                                      1.5, 4)
    assert (client._rpm.rate, client._tpm.rate) == (2, 10)
    for argv, message in [(["--timeout=0"], "--timeout must be > 0"), (["--max_retries=-1"], "--max_retries must be"),
                          (["--backoff=-1"], "--backoff must be >= 0"),
                          (["--timeout=1e10"], "at most 86400 s")]:  # a socket's timeout overflows past 9.2e9
        cfg, _ = parse_args(llm.DEFAULTS, argv=argv)
        with pytest.raises(UserError, match=message):
            llm.client_from(cfg, "m")


def test_usage_missing_or_not_integers_is_counted_apart_and_warned_about_once(extra_faults, capsys):
    """Counted as 0 tokens, such replies made the cost read $0.00 as if it were known."""
    with FakeLLM(faults=["odd_usage", "no_usage", "ok"]) as server, client_for(server, price_in=1.0) as client:
        reply = client.chat(MESSAGES)
        assert (reply.text, reply.usage, reply.finish_reason) == ("hi", None, None)
        assert client.chat(MESSAGES).usage is None and client.chat(MESSAGES).usage
        s = client.stats
        assert s.no_usage == 2 and s.tokens_in > 0 and s.cost > 0
    assert capsys.readouterr().err.count("reports no token usage") == 1


def test_check_reports_a_forbidden_key(monkeypatch):
    import llm_server
    monkeypatch.setattr(llm_server.Handler, "do_GET", lambda self: self.error(403, "No access.", "forbidden"))
    with FakeLLM() as server:
        with pytest.raises(llm.LLMError, match="refused the API key") as error:
            llm.Client(server.url, "fake").check()
        assert (error.value.failure.status, error.value.failure.fatal) == (403, True)


def test_connecting_and_check_wait_at_most_ten_seconds_whatever_the_timeout(monkeypatch):
    asked = []
    for method in ("get", "post"):
        monkeypatch.setattr(requests.Session, method, lambda self, url, **kw: asked.append(kw["timeout"]) or 1 / 0)
    client = llm.Client("http://127.0.0.1:9/v1", "fake", timeout=60, max_retries=0)
    with pytest.raises(ZeroDivisionError):  # stands in for the answer: only the timeouts asked for matter
        client.chat(MESSAGES)
    with pytest.raises(ZeroDivisionError):
        client.check()
    assert asked == [(10.0, 60), 10.0]


@contextlib.contextmanager
def dripping(first: bytes, drip: bytes, every: float = 0.05):
    """The URL of a server that answers each request with first, then drip every `every` s, for 5 s
    (a client that never times out then fails its test, not hangs it)."""
    def serve(listener):
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                threading.Thread(target=answer, args=(listener.accept()[0],), daemon=True).start()

    def answer(conn):
        with conn, contextlib.suppress(OSError):  # the client gave up
            conn.recv(1 << 16)
            conn.sendall(first)
            for _ in range(int(5 / every)):
                conn.sendall(drip)
                time.sleep(every)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"


@pytest.mark.parametrize("first, drip", [(b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
                                         (b"HTTP/1.1 200 OK\r\n", b"X-Drip: 1\r\n")],
                         ids=["100-continue", "header-drip"])
def test_headers_that_never_end_time_out(first, drip):
    """The timeout bounded only the body: endless "100 Continue"s held a request (and check()) for
    ever, and a header line every 0.3 s held it 30 s, to fail as "got more than 100 headers"."""
    with dripping(first, drip) as url:
        client = llm.Client(url, "fake", timeout=0.5, backoff=0.01, max_retries=1)
        started = time.monotonic()
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        assert (error.value.failure.kind, error.value.failure.attempts) == ("timeout", 2)
        with pytest.raises(llm.LLMError, match="did not answer within 0.5 s"):
            client.check()
        assert time.monotonic() - started < 3


GZIP_COMMENT = b"\x1f\x8b\x08\x10\0\0\0\0\0\x03"  # a gzip header whose comment follows, up to a NUL byte


@pytest.mark.parametrize("first, drip, every", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b" ", 0.9),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n" + GZIP_COMMENT, b"a", 0.05),
    # requests read a redirect's body itself, to follow it: past the deadline (and without end)
    (b"HTTP/1.1 302 Found\r\nLocation: http://example.com/\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n",
     0.05)],
    ids=["byte-within-each-read-timeout", "gzip-comment", "redirect-body"])
def test_a_body_that_trickles_in_times_out_at_the_timeout(first, drip, every):
    """Checked after each read, the deadline was passed by the read's own wait: a byte every 0.9 s
    ended 1 s requests at 1.8 s, and a gzip header's comment (one read, as it decodes to nothing) never."""
    with dripping(first, drip, every) as url:
        client = llm.Client(url, "fake", timeout=1, max_retries=0)
        started = time.monotonic()
        with pytest.raises(llm.LLMError, match="timeout: no answer within 1 s"):
            client.chat(MESSAGES)
        assert time.monotonic() - started < 1.5


def test_a_redirect_is_fatal_and_names_the_api_base_to_use(monkeypatch):
    """Followed, a redirect turned each POST into a GET, which was refused (405) as if for the
    settings sent; check() followed it and passed."""
    import llm_server

    def moved(self):
        self.send_response(301)
        self.send_header("Location", "https://example.com" + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    monkeypatch.setattr(llm_server.Handler, "do_GET", moved)
    monkeypatch.setattr(llm_server.Handler, "do_POST", moved)
    with FakeLLM() as server, client_for(server) as client:
        message = f"{server.url}/models redirects to https://example.com/v1/models: use https://example.com/v1 as " \
                  f"--api_base"
        with pytest.raises(llm.LLMError) as error:
            client.check()
        assert error.value.failure.message == message
        with pytest.raises(llm.LLMError) as error:
            client.chat(MESSAGES)
        failure = error.value.failure
        assert (failure.status, failure.fatal, failure.attempts) == (301, True, 1)
        assert failure.message.endswith("/chat/completions: use https://example.com/v1 as --api_base")

    def slash(self):  # /models to /models/, on the same server: the check passes, as for a server without /models
        self.send_response(307)
        self.send_header("Location", self.path + "/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    monkeypatch.setattr(llm_server.Handler, "do_GET", slash)
    with FakeLLM() as server, client_for(server) as client:
        client.check()
