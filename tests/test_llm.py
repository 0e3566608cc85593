"""llm.py against a local fake OpenAI-compatible server: replies, retries, limits, failures."""

import email.utils
import signal
import socket
import threading
import time

import pytest
import requests

import llm
from llm_server import FakeLLM, answer

MESSAGES = [{"role": "user", "content": "Tell me about loops."}]


def client_for(server, **kw):
    return llm.Client(server.url, "fake", **{"backoff": 0.01, "timeout": 0.5, **kw})


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
                                         ("slow", "timeout"), ("malformed", "bad_response"),
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
    for argv, message in [(["--concurrency=0"], "--concurrency must be >= 1"), (["--tpm=-1"], "--rpm and --tpm"),
                          (["--price_out=-2"], "--price_in and --price_out"),
                          (["--api_base=ftp://example.com"], "http:// or https://")]:
        cfg, _ = parse_args(llm.DEFAULTS, argv=argv)
        with pytest.raises(UserError, match=message):
            llm.client_from(cfg, "some-model")
