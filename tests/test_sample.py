"""sample.py: the command line, and the OpenAI-compatible server answering the official client."""

import dataclasses
import http.client
import json
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai  # requirements-test.txt: a broken install fails, not skips
import pytest
import torch

import sample
import model as model_module
import tokenizer
from config import UserError, parse_args
from model import GPT, PRESETS, derived_seed, load_checkpoint, load_model

ROOT = Path(__file__).resolve().parent.parent
NAME = "nano-test"
BLOCK = PRESETS["nano"].block_size  # 64 tokens of context


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random nano model saved the way train.py saves checkpoints."""
    torch.manual_seed(0)
    config = PRESETS["nano"]
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": GPT(config).state_dict(), "config": dataclasses.asdict(config), "step": 0}, path)
    load_checkpoint(path)  # holds what a checkpoint must
    return path


@pytest.fixture(scope="module")
def reference(ckpt) -> GPT:
    """The same weights outside the server, for the answers to expect."""
    return GPT.from_checkpoint(ckpt).eval()


@pytest.fixture(scope="module")
def server(ckpt):
    cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", "--port=0", "--quiet", "--max_batch=8",
                                               "--batch_wait_ms=50"])
    server = sample.Server(cfg)
    server.start(load_model(str(ckpt), torch.device("cpu"), torch.float32), NAME)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.close()
    thread.join(10)


@pytest.fixture(scope="module")
def client(server):
    port = server.server_address[1]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)


def expect(reference: GPT, prompt: str, max_tokens: int, stop=()) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a lone greedy completion."""
    ids = tokenizer.encode(prompt) or [tokenizer.EOT]
    max_new = min(max_tokens, BLOCK - len(ids))
    new = reference.generate([ids], max_new, stop=list(stop))[0]
    return (*sample.cut(new, max_new, stop), len(new))


def raw(server, method: str, path: str, body=None, headers=None):
    """(status, parsed JSON) of one request sent without the openai client."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


# ---------------------------------------------------------------- helpers

def test_parse_stop_splits_on_commas_and_reads_escapes():
    assert sample.parse_stop("") == []
    assert sample.parse_stop(r"\ndef,\nclass") == ["\ndef", "\nclass"]
    assert sample.parse_stop(r"a\,b,\\,\t") == ["a,b", "\\", "\t"]


def test_cut_stops_at_the_first_stop_string_and_names_the_reason():
    ids = tokenizer.encode("x = 1\ny = 2\ndef f():")
    assert sample.cut(ids, 100, ("\ndef", "\ny")) == ("x = 1", "stop")
    assert sample.cut(ids, len(ids), ()) == ("x = 1\ny = 2\ndef f():", "length")
    assert sample.cut(ids, len(ids) + 1, ()) == ("x = 1\ny = 2\ndef f():", "stop")  # ended at <|endoftext|>
    assert sample.cut(ids, len(ids), ("",)) == ("x = 1\ny = 2\ndef f():", "length")  # as generate(): stops nothing


def test_chat_template():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Add"},
                                             {"type": "text", "text": "two."}]}]
    assert sample.chat_prompt(messages) == "system: Be brief.\nuser: Add\ntwo.\nassistant:"


def test_every_greedy_request_gets_the_same_sampling_mode():
    # one batching key for all greedy requests, whatever top_p they name
    assert sample.sampling_mode(0, 0.5) == sample.sampling_mode(1e-5, 1.0) == (0.0, 1.0)
    assert sample.sampling_mode(0.7, 0.9) == (0.7, 0.9)


def test_requests_default_to_the_server_settings():
    cfg, _ = parse_args(sample.DEFAULTS, argv=[r"--stop=\ndef,\nclass", "--max_new_tokens=7",
                                               "--temperature=0.5", "--top_p=0.5"])
    s = sample.parse_sampling({}, cfg, chat=False)
    assert (s.stop, s.max_tokens, s.temperature, s.top_p, s.n) == (("\nclass", "\ndef"), 7, 0.5, 0.5, 1)
    assert sample.parse_sampling({"stop": "x", "max_tokens": 3}, cfg, chat=False).stop == ("x",)
    both = {"max_tokens": 5, "max_completion_tokens": 3}
    assert sample.parse_sampling(both, cfg, chat=True).max_tokens == 3  # chat's newer name wins
    assert sample.parse_sampling(both, cfg, chat=False).max_tokens == 5
    assert sample.parse_sampling({"stop": ["", "x"]}, cfg, chat=False).stop == ("x",)  # "" stops nothing


def test_streamed_pieces_never_give_the_start_of_a_stop_string():
    text = "y = 2\nreturn 1"
    ids = [t for c in text for t in tokenizer.encode(c)]  # a token per character: every prefix is seen
    stop = ("\nreturn",)
    row = sample.Row(ids, len(ids), 0.0, 1.0, stop, None, 0, queue.Queue())
    for token in ids:
        row.push(token)
    row.finish(ids)
    pieces = [piece for _, piece, _ in sample.Handler.streamed_texts([row], stop, chat=False)]
    assert "".join(pieces) == "y = 2" and len(pieces) > 1


# ---------------------------------------------------------------- the official client

def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_greedy_completion_equals_generate(client, reference):
    prompt = "def add(a, b):"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    text, reason, n_new = expect(reference, prompt, 12)
    assert r.model == NAME and r.object == "text_completion" and len(r.choices) == 1
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, reason)
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt)) and r.usage.completion_tokens == n_new
    assert r.usage.total_tokens == r.usage.prompt_tokens + n_new


def test_list_of_prompts_with_n_and_echo(client, reference):
    prompts = ["import os\n", "class Stack:"]
    r = client.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=6, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, choice in enumerate(r.choices):
        prompt = prompts[i // 2]
        assert choice.text == prompt + expect(reference, prompt, 6)[0]
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)


def test_stop_string_or_list_cuts_the_text(client, reference):
    prompt = "for i in range(10):"
    ids = reference.generate([tokenizer.encode(prompt)], 30)[0]
    full = tokenizer.decode(ids)
    # a stop string the model will produce: the text of a later ASCII token
    stop = next(p for p in (tokenizer.decode([t]) for t in ids[3:]) if p.strip() and p.isascii())
    for stops in (stop, [stop, "never produced"]):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=stops)
        assert r.choices[0].text == full[:full.index(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_max_tokens_is_clamped_to_the_context(client, reference):
    prompt = "print('hello')"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10_000, temperature=0)
    text, reason, n_new = expect(reference, prompt, 10_000)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, reason, n_new)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= BLOCK


def test_max_tokens_zero_echoes_the_prompt_alone(client):
    r = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=0, echo=True)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("def f(x):", "length")
    assert r.usage.completion_tokens == 0


def test_an_empty_prompt_starts_a_new_document(client, reference):
    r = client.completions.create(model=NAME, prompt="", max_tokens=5, temperature=0)
    assert r.choices[0].text == expect(reference, "", 5)[0] and r.usage.prompt_tokens == 1


def test_token_id_prompts_equal_their_text(client):
    prompt = "def add(a, b):"
    ids = tokenizer.encode(prompt)
    ask = dict(model=NAME, max_tokens=6, temperature=0)
    text = client.completions.create(prompt=prompt, **ask).choices[0].text
    assert [c.text for c in client.completions.create(prompt=ids, **ask).choices] == [text]
    assert [c.text for c in client.completions.create(prompt=[ids, ids], **ask).choices] == [text, text]


def test_chat_cuts_at_a_stop_of_the_request_with_or_without_stream(client, reference):
    messages = [{"role": "user", "content": "Sort a list."}]
    ids = reference.generate([tokenizer.encode(sample.chat_prompt(messages))], 20, stop=list(sample.CHAT_STOPS))[0]
    full = sample.cut(ids, 20, sample.CHAT_STOPS)[0]
    stop = next(p for p in (tokenizer.decode([t]) for t in ids[2:]) if p.strip() and p.isascii() and p in full)
    ask = dict(model=NAME, messages=messages, max_tokens=20, temperature=0, stop=stop)
    r = client.chat.completions.create(**ask)
    assert r.choices[0].message.content == full[:full.index(stop)].removeprefix(" ")
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_a_seeded_request_split_over_batches_draws_fresh_samples_in_each(client, reference):
    # the fixture's --max_batch=8: n=10 rows run as 8, then 2, each batch with a seed of its own
    ids = tokenizer.encode("def f(x):")
    r = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=6, temperature=1.0, top_p=0.9,
                                  n=10, seed=5)
    outs = (reference.generate([ids] * 8, 6, temperature=1.0, top_p=0.9, seed=derived_seed(5, 0))
            + reference.generate([ids] * 2, 6, temperature=1.0, top_p=0.9, seed=derived_seed(5, 1)))
    assert [c.text for c in r.choices] == [sample.cut(new, 6, ())[0] for new in outs]
    # and seed 6's first batch draws other samples than seed 5's second (seed + index made them one)
    assert derived_seed(6, 0) != derived_seed(5, 1)


def test_chat_completion_follows_the_template(client, reference):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Add two numbers."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    text, reason, n_new = expect(reference, sample.chat_prompt(messages), 10, sample.CHAT_STOPS)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text.removeprefix(" ")
    assert r.choices[0].finish_reason == reason and r.usage.completion_tokens == n_new


def test_seeded_sampling_is_reproducible(client, reference):
    ask = dict(model=NAME, prompt="def f(x):", max_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=5)
    first, second = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert texts[0] != texts[1]  # n samples, not n copies
    ids = tokenizer.encode("def f(x):")
    alone = reference.generate([ids, ids], 8, temperature=1.0, top_p=0.9, seed=derived_seed(5, 0))  # alone
    assert texts == [sample.cut(new, 8, ())[0] for new in alone]


def test_a_top_p_too_small_for_float32_is_greedy(client, reference):
    assert sample.sampling_mode(1.0, 1e-320) == (0.0, 1.0)
    r = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=8, temperature=1.0, top_p=1e-320)
    assert r.choices[0].text == expect(reference, "def f(x):", 8)[0]


def test_served_samples_without_a_seed_differ_from_one_start_to_the_next(ckpt, reference):
    """Batches without a request seed draw theirs from the OS, unless --seed says otherwise."""
    def first_sample(*args):
        cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", "--port=0", *args])
        server = sample.Server(cfg)
        server.start(reference, NAME)
        row = sample.Row(tokenizer.encode("def f(x):"), 16, 1.0, 1.0, (), None, 0)
        server.engine.submit([row])
        try:
            return row.future.result(timeout=60)
        finally:
            server.close()

    assert first_sample() != first_sample()
    assert first_sample("--seed=5") == first_sample("--seed=5")


def test_concurrent_requests_are_batched_and_equal_lone_answers(client, server):
    prompts = ["def f(x):", "import sys", "x = [", "class A:", "# sort a list", "while True:", "return None",
               "try:", "async def g():", "from typing import List", "lambda x:", "if __name__ == '__main__':"]
    asks = [dict(model=NAME, prompt=p, max_tokens=4 + i % 5, temperature=0,
                 stop=["\n"] if i % 3 == 0 else None) for i, p in enumerate(prompts)]
    chat = dict(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0)

    def ask(kwargs):
        if "messages" in kwargs:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        return client.completions.create(**kwargs).choices[0].text

    lone = [ask(a) for a in asks + [chat]]
    server.engine.largest_batch = 0
    with ThreadPoolExecutor(len(asks) + 1) as pool:
        together = list(pool.map(ask, asks + [chat]))
    assert together == lone
    assert server.engine.largest_batch > 1


def test_rows_with_different_stops_in_one_batch_keep_their_own(server, reference):
    ids = tokenizer.encode("for i in range(10):")
    full = reference.generate([ids], 12)[0]
    stop = next(p for p in (tokenizer.decode([t]) for t in full[1:]) if p.strip() and p.isascii())
    stopped, unstopped = (sample.Row(ids, 12, 0.0, 1.0, s, None, -1) for s in ((stop,), ()))
    server.engine.submit([stopped, unstopped])  # one queue item: taken together
    assert unstopped.future.result(timeout=60) == full
    assert stopped.future.result(timeout=60) == reference.generate([ids], 12, stop=[stop])[0]


def test_a_seed_does_not_fix_the_samples_of_other_requests_in_its_batch(server):
    ids = tokenizer.encode("def f(x):")

    def unseeded_sample():
        seeded, unseeded = sample.Row(ids, 8, 1.0, 1.0, (), 5, -1), sample.Row(ids, 8, 1.0, 1.0, (), None, -2)
        server.engine.submit([seeded, unseeded])  # one queue item: one batch
        return unseeded.future.result(timeout=60)

    assert unseeded_sample() != unseeded_sample()


def test_rows_too_long_for_one_context_together_are_generated_apart(server, reference):
    long_prompt, short_prompt = tokenizer.encode(" x" * (BLOCK - 4)), tokenizer.encode("x")
    rows = [sample.Row(long_prompt, 4, 0.0, 1.0, (), None, -1),
            sample.Row(short_prompt, BLOCK - 1, 0.0, 1.0, (), None, -1)]
    server.engine.submit(rows)
    for row in rows:
        assert row.future.result(timeout=60) == reference.generate([row.prompt], row.max_new)[0]


def test_a_seeded_request_split_from_another_into_a_batch_of_its_own_draws_as_alone(server, reference):
    """Its batch's seed came from its index among all of the round's batches (here 1, after the
    long prompt's), not among its own: other samples than alone, where its rows made a batch alone."""
    long_prompt, ids = tokenizer.encode(" x" * (BLOCK - 8)), tokenizer.encode("def f(x):")
    other, seeded = sample.Row(long_prompt, 4, 1.0, 1.0, (), None, -1), sample.Row(ids, 30, 1.0, 1.0, (), 5, -2)
    server.engine.submit([other, seeded])  # one queue item, one group: too long together, split apart
    assert seeded.future.result(timeout=60) == reference.generate([ids], 30, 1.0, 1.0, seed=derived_seed(5, 0))[0]


class HeldModel:
    """A model whose generate sets started, then holds its batch until release is set."""
    config = PRESETS["nano"]

    def __init__(self, started: threading.Event, release: threading.Event):
        self.started, self.release = started, release

    def generate(self, prompts, max_new, *args, on_token, **kwargs):
        self.started.set()
        self.release.wait(20)
        for i, budget in enumerate(max_new):
            for _ in range(budget):
                on_token(i, 1)
            on_token(i, None)
        return [[1] * budget for budget in max_new]


def test_closing_the_engine_fails_the_rows_still_queued():
    """At once: their 503s came only when the running batch ended (minutes, on a CPU), and
    their clients (llm.py waits 120 s) timed out instead of retrying another server."""
    started, release = threading.Event(), threading.Event()

    engine = sample.Engine(HeldModel(started, release), max_batch=8, batch_wait_ms=0)
    running, queued = sample.Row([1], 2, 0.0, 1.0, (), None, 0), sample.Row([1], 2, 0.0, 1.0, (), None, 1)
    engine.submit([running])
    assert started.wait(20)
    engine.submit([queued])
    closer = threading.Thread(target=engine.close)
    closer.start()
    try:
        assert isinstance(queued.future.exception(timeout=20), sample.ApiError)
        assert queued.future.exception().status == 503 and not running.future.done()
    finally:
        release.set()
    closer.join(20)
    assert running.future.result(timeout=20) == [1, 1]


def test_closing_the_server_waits_until_the_answers_are_sent(monkeypatch):
    """serve() exits when close returns, ending the handler threads: the running request's
    answer and the queued one's 503 must be sent by then."""
    started, release, send = threading.Event(), threading.Event(), threading.Event()

    send_json = sample.Handler.send_json

    def slow_send_json(self, *args):  # handlers that are slow to write, once the engine is done
        send.wait(20)
        send_json(self, *args)

    monkeypatch.setattr(sample.Handler, "send_json", slow_send_json)
    cfg, _ = parse_args(sample.DEFAULTS, argv=["--port=0", "--quiet", "--batch_wait_ms=0"])
    server = sample.Server(cfg)
    server.start(HeldModel(started, release), NAME)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ask = dict(model=NAME, prompt="x", max_tokens=2)
    closer = threading.Thread(target=server.close)
    with ThreadPoolExecutor(3) as pool:
        try:
            running = pool.submit(raw, server, "POST", "/v1/completions", ask)
            assert started.wait(20)
            queued = pool.submit(raw, server, "POST", "/v1/completions", ask)
            queued_stream = pool.submit(raw, server, "POST", "/v1/completions", {**ask, "stream": True})
            while server.engine.queue.qsize() < 2:
                time.sleep(0.01)
            server.shutdown()  # as Ctrl-C ends serve_forever
            closer.start()
            while not server.engine.closed:
                time.sleep(0.01)
            release.set()
            closer.join(1)
            assert closer.is_alive()  # the answers are not sent yet
        finally:
            release.set()
            send.set()
    closer.join(20)
    assert not closer.is_alive()
    status, body = running.result()
    assert status == 200 and body["choices"][0]["text"] == tokenizer.decode([1, 1])
    assert queued.result()[0] == 503
    # as its HTTP status, not a 200 and an error event, which clients do not retry
    assert queued_stream.result()[0] == 503


def test_the_port_refuses_connections_until_the_model_is_loaded():
    """It listened from the start: a client trying while the model loaded (tens of seconds
    for phi-1) was held unanswered in the backlog, and llm.py's check said the server did not
    answer in 10 s, where a refused connection is retried."""
    cfg, _ = parse_args(sample.DEFAULTS, argv=["--port=0", "--quiet"])
    server = sample.Server(cfg)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(server.server_address[:2], timeout=5)
        server.start(HeldModel(threading.Event(), threading.Event()), NAME)
        socket.create_connection(server.server_address[:2], timeout=5).close()
    finally:
        server.close()


def test_a_client_slow_to_send_its_body_holds_up_no_shutdown():
    """It was counted busy while its body came in: Server.close waited for a body that
    might never come (up to the connection's 300 s timeout, or for ever at a byte a minute)."""
    cfg, _ = parse_args(sample.DEFAULTS, argv=["--port=0", "--quiet"])
    server = sample.Server(cfg)
    server.start(HeldModel(threading.Event(), threading.Event()), NAME)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.create_connection(server.server_address[:2]) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)  # the handler waits for the rest
        server.shutdown()
        closer = threading.Thread(target=server.close, daemon=True)
        closer.start()
        closer.join(10)
        assert not closer.is_alive()


def test_a_body_that_stalls_is_a_408_and_one_cut_short_is_dropped_quietly(server, monkeypatch):
    """Both were 500s, internal errors, and a reset printed its traceback."""
    monkeypatch.setattr(sample.Handler, "timeout", 0.5)
    with socket.create_connection(server.server_address[:2]) as sock:  # connected after the patch
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in reply
    assert b"Connection: close" in reply
    logged = queue.Queue()
    monkeypatch.setattr(sample.Handler, "log_message", lambda self, fmt, *args: logged.put(fmt % args))
    monkeypatch.setattr(traceback, "print_exc", lambda: logged.put("traceback"))
    for reset in (False, True):
        sock = socket.create_connection(server.server_address[:2])
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        if reset:  # closed with an RST, not a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert "the client hung up before its body was in" in logged.get(timeout=10)
    assert raw(server, "POST", "/v1/completions", GOOD)[0] == 200


def test_a_post_without_content_length_and_a_bad_request_line_get_http_answers(server):
    """Without a length the body was taken as empty (a 400 "Expecting value"), and left on a
    keep-alive connection to be read as the next request line. A request line http.server
    refuses was answered as HTTP/0.9: a body without a status line."""
    for request, status in [(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
                            (b"HELLO\r\n\r\n", b"400"), (b"GET /v1/models HTTP/2.0\r\n\r\n", b"505")]:
        with socket.create_connection(server.server_address[:2], timeout=20) as sock:  # kept open: a hang
            sock.sendall(request)
            reply = sock.makefile("rb").read()
        assert reply.split(b"\r\n")[0].split()[:2] == [b"HTTP/1.1", status], reply
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_a_stream_whose_generation_fails_before_its_first_token_gets_the_http_status(client, server,
                                                                                     monkeypatch):
    def fail(*args, on_token, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(server.engine.model, "generate", fail)
    with pytest.raises(openai.InternalServerError, match="generation failed"):
        list(client.completions.create(model=NAME, prompt="x", max_tokens=5, stream=True, echo=True))
    with pytest.raises(openai.InternalServerError, match="generation failed"):
        list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            stream=True))


class SteppingModel:
    """A model whose generate gives every row token 1 each step until its budget, after
    calling hook(step), and counts the steps of each call in `steps`."""
    config = PRESETS["nano"]

    def __init__(self, hook):
        self.hook, self.steps = hook, []

    def generate(self, prompts, max_new, *args, on_token, **kwargs):
        self.steps.append(0)
        for step in range(max(max_new)):
            self.steps[-1] += 1
            self.hook(step)
            for i, budget in enumerate(max_new):
                if step < budget:
                    on_token(i, 1)
                if step == budget - 1:
                    on_token(i, None)
        return [[1] * budget for budget in max_new]


def test_a_batch_runs_on_for_live_rows_and_stops_at_the_next_token_once_all_are_cancelled():
    cancel_at_step_2 = []

    def hook(step):
        if step == 2:
            for row in cancel_at_step_2:
                row.cancelled = True

    model = SteppingModel(hook)
    engine = sample.Engine(model, max_batch=8, batch_wait_ms=0)
    try:
        gone, live = sample.Row([1], 6, 0.0, 1.0, (), None, 0), sample.Row([1], 6, 0.0, 1.0, (), None, 1)
        cancel_at_step_2[:] = [gone]
        engine.submit([gone, live])
        assert live.future.result(timeout=20) == [1] * 6 and model.steps == [6]

        cancel_at_step_2[:] = [sample.Row([1], 6, 0.0, 1.0, (), None, r) for r in (2, 3)]
        engine.submit(cancel_at_step_2)
        after = sample.Row([1], 1, 1.0, 1.0, (), None, 4)  # another sampling mode: a batch of its own, next
        engine.submit([after])
        assert after.future.result(timeout=20) == [1]
        assert model.steps == [6, 3, 1]
    finally:
        engine.close()


def test_a_row_is_answered_as_it_ends_and_its_batch_stops_once_the_rest_are_cancelled(reference, monkeypatch):
    """A short request batched with a long one does not wait for it (streamed, its finish
    event goes out at once), and no token is generated once every row left is cancelled."""
    ids = tokenizer.encode("def f(x):")
    lone = reference.generate([ids], 2)[0]
    short = sample.Row(ids, 2, 0.0, 1.0, (), None, 0, queue.Queue())
    long = sample.Row(ids, 30, 0.0, 1.0, (), None, 1)
    answered, sample_tokens = [], model_module.sample

    def spy(*args):  # at each decoding step: has short been answered?
        answered.append(short.future.done() and short.tokens.queue[-1] == (short, None))
        if len(answered) == 4:
            long.cancelled = True  # its client hangs up
        return sample_tokens(*args)

    monkeypatch.setattr(model_module, "sample", spy)
    engine = sample.Engine(reference, max_batch=8, batch_wait_ms=0)
    engine.submit([short, long])  # one queue item: one batch
    assert short.future.result(timeout=60) == lone
    engine.close()  # returns once the batch is done
    assert answered == [False, False, True, True]  # the 4th step's tokens are for nobody: the last
    assert list(short.tokens.queue) == [(short, t) for t in lone] + [(short, None)]
    assert not long.future.done()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_hangs_up_while_queued_is_never_generated(reference, monkeypatch, stream):
    """A streamed one still ran when its turn came: its handler only looked at the socket when writing."""
    cfg, _ = parse_args(sample.DEFAULTS, argv=["--port=0", "--quiet", "--max_batch=1", "--batch_wait_ms=0"])
    server = sample.Server(cfg)
    server.start(reference, NAME)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prompts, real_generate, sample_tokens = [], GPT.generate, model_module.sample
    monkeypatch.setattr(GPT, "generate", lambda self, p, *a, **k: prompts.extend(p) or real_generate(self, p, *a, **k))
    monkeypatch.setattr(model_module, "sample", lambda *a: time.sleep(0.05) or sample_tokens(*a))
    try:
        first = threading.Thread(target=raw, args=(server, "POST", "/v1/completions",
                                                   dict(GOOD, prompt="a", max_tokens=30)))
        first.start()
        while not prompts:  # the first request runs
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", server.server_address[1])) as sock:
            send_request(sock, dict(GOOD, prompt="b = 1", max_tokens=30, stream=stream))
            time.sleep(0.3)  # queued behind the first; then the client gives up
        first.join(60)
        time.sleep(0.5)  # its turn has come and gone
        assert prompts == [tokenizer.encode("a")]
    finally:
        server.shutdown()
        server.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_short_request_batched_with_a_long_one_is_answered_first(reference, monkeypatch, stream):
    """max_tokens=1 sent just after max_tokens=40: the same answers as alone, the short
    one's while the long one still generates."""
    expected = [expect(reference, "#", max_tokens) for max_tokens in (40, 1)]
    cfg, _ = parse_args(sample.DEFAULTS, argv=["--port=0", "--quiet", "--max_batch=2", "--batch_wait_ms=10000"])
    server = sample.Server(cfg)  # the second request fills the batch: it starts at once
    server.start(reference, NAME)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    short_answered, steps, sample_tokens = threading.Event(), [], model_module.sample

    def spy(*args):  # before the long row's 4th token, wait until the short one is answered
        steps.append(short_answered.wait(timeout=20) if len(steps) == 3 else None)
        return sample_tokens(*args)

    def ask(max_tokens):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x",
                               max_retries=0, timeout=60)
        request = dict(model=NAME, prompt="#", max_tokens=max_tokens, temperature=0)
        if not stream:
            r = client.completions.create(**request)
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
        return ("".join(c.choices[0].text for c in chunks if c.choices), chunks[-2].choices[0].finish_reason,
                chunks[-1].usage.completion_tokens)

    monkeypatch.setattr(model_module, "sample", spy)
    try:
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(ask, 40)
            assert ask(1) == expected[1]
            short_answered.set()
            assert long.result() == expected[0]
    finally:
        short_answered.set()
        server.shutdown()
        server.close()
    assert steps[3] is True and len(steps) == 40  # the batch ran on for the long row


def send_request(sock, body: dict) -> None:
    data = json.dumps(body)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n{data}".encode())


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_cancels_its_rows(server, monkeypatch, stream):
    """Its running batch stops and its queued one never starts: nobody would read them,
    and llm.py, timing out, asks again."""
    model = SteppingModel(lambda step: time.sleep(0.05))
    monkeypatch.setattr(server.engine.model, "generate", model.generate)
    with socket.create_connection(server.server_address[:2]) as sock:
        send_request(sock, {**GOOD, "max_tokens": BLOCK - 2, "n": 16, "stream": stream})  # 2 batches of 8
        while not model.steps:
            time.sleep(0.01)
    assert raw(server, "POST", "/v1/completions", GOOD)[0] == 200  # after what is left of the first
    assert len(model.steps) == 2 and model.steps[0] < BLOCK - 2 and model.steps[1] == 1


def test_a_request_sent_while_another_waits_is_not_taken_for_a_hang_up(server, monkeypatch):
    """The handler peeks at the connection while it waits: a keep-alive client's next
    request is there, unread, for the handler to answer next."""
    model = SteppingModel(lambda step: time.sleep(0.05))
    monkeypatch.setattr(server.engine.model, "generate", model.generate)
    ask = {**GOOD, "max_tokens": 8}  # 0.4 s: several looks at the connection
    with socket.create_connection(server.server_address[:2]) as sock:
        send_request(sock, ask)
        while not model.steps:
            time.sleep(0.01)
        send_request(sock, ask)
        responses = sock.makefile("rb")
        for _ in range(2):
            assert responses.readline().split()[1] == b"200"
            headers = dict(line.decode().split(": ", 1) for line in iter(responses.readline, b"\r\n"))
            assert json.loads(responses.read(int(headers["Content-Length"])))["usage"]["completion_tokens"] == 8
    assert model.steps == [8, 8]


def test_streaming_gives_the_same_answer(client):
    ask = dict(model=NAME, prompt="x = 1", max_tokens=6, temperature=0)
    whole = client.completions.create(**ask).choices[0]
    chunks = list(client.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason

    chat = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_completions_of_several_prompts_with_n_echo_and_usage(client):
    ask = dict(model=NAME, prompt=["x = 1", "def f(x):"], n=2, max_tokens=6, temperature=0, echo=True)
    whole = client.completions.create(**ask)
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    texts, reasons = [""] * 4, [None] * 4
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason
    assert texts == [c.text for c in whole.choices] and reasons == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


@pytest.mark.parametrize("stop, chat", [((), False), (("\n\ndef",), False), (("語",), False), ((), True)])
def test_streamed_pieces_join_into_the_cut_text_and_hold_back_what_may_change(stop, chat):
    text = " 日本語 naïve\nreturn x\n\ndef g(): 🙂 日本語"
    ids = tokenizer.encode(text)
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(len(ids)))  # a prefix ends mid-character
    row = sample.Row(ids, len(ids), 0.0, 1.0, stop, None, 0, queue.Queue())
    for token in ids:
        row.push(token)
    row.finish(ids)
    pieces = list(sample.Handler.streamed_texts([row], stop, chat))
    expected, reason = sample.cut(ids, len(ids), stop)
    assert "".join(piece for _, piece, _ in pieces) == (expected.removeprefix(" ") if chat else expected)
    assert [r for _, _, r in pieces] == [None] * (len(pieces) - 1) + [reason]
    assert len(pieces) > 3 and not any("\ufffd" in piece for _, piece, _ in pieces)


@pytest.mark.parametrize("text, stop, chat", [
    (" yes\nuser: thanks", tuple(sorted(sample.CHAT_STOPS)), True),  # shorter than the hold-back
    ("x = 1 \u00ff", (" \u00ff",), False),  # a stop behind a character still cut in two
])
def test_a_streamed_piece_never_holds_text_the_answer_lacks(text, stop, chat):
    ids = tokenizer.encode(text)
    row = sample.Row(ids, len(ids), 0.0, 1.0, stop, None, 0, queue.Queue())
    for token in ids:
        row.push(token)
    row.finish(ids)
    streamed = "".join(piece for _, piece, _ in sample.Handler.streamed_texts([row], stop, chat))
    expected, reason = sample.cut(ids, len(ids), stop)
    assert reason == "stop" and streamed == (expected.removeprefix(" ") if chat else expected)


def test_stream_sends_text_as_it_is_generated(client, server, monkeypatch):
    """Generation pauses after its first visible text until the client holds it:
    a server that sent the stream only at the end would keep it waiting."""
    seen, waited, kept = threading.Event(), [], []
    real = server.engine.model.generate

    def generate(*args, on_token, **kwargs):
        def hook(row, token):
            on_token(row, token)
            if token is None:
                return
            kept.append(token)
            if not waited and tokenizer.decode(kept).rstrip("\ufffd"):
                waited.append(seen.wait(timeout=20))
        return real(*args, on_token=hook, **kwargs)

    monkeypatch.setattr(server.engine.model, "generate", generate)
    pieces = []
    for chunk in client.completions.create(model=NAME, prompt="def f(x):", max_tokens=12, temperature=0,
                                           stream=True):
        pieces.append(chunk.choices[0].text)
        seen.set()
    assert waited == [True] and len(kept) == 12
    assert "".join(pieces) == sample.cut(kept, 12, ())[0]


def test_stream_echoes_the_prompt_and_ends_with_an_error_event_if_generation_fails(client, server, monkeypatch):
    chunks = list(client.completions.create(model=NAME, prompt="x = [", max_tokens=5, temperature=0,
                                            echo=True, stream=True))
    whole = client.completions.create(model=NAME, prompt="x = [", max_tokens=5, temperature=0, echo=True)
    assert chunks[0].choices[0].text == "x = ["
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text

    def fail(*args, on_token, **kwargs):
        on_token(0, tokenizer.encode(" y")[0])
        raise RuntimeError("out of memory")

    monkeypatch.setattr(server.engine.model, "generate", fail)
    texts = []
    with pytest.raises(openai.APIError, match="generation failed"):
        for chunk in client.completions.create(model=NAME, prompt="x", max_tokens=5, stream=True):
            texts.append(chunk.choices[0].text)
    assert texts == [" y"]


def test_a_chat_reply_loses_only_the_space_after_the_colon(client, server, monkeypatch):
    def replying(text):
        def generate(prompts, *args, on_token, **kwargs):
            new = tokenizer.encode(text)
            for token in new + [None]:
                on_token(0, token)
            return [new]
        return generate

    ask = dict(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=20)
    monkeypatch.setattr(server.engine.model, "generate", replying("  x = [1, 2]\n\n"))
    assert client.chat.completions.create(**ask).choices[0].message.content == " x = [1, 2]\n\n"
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " x = [1, 2]\n\n"

    # an empty reply: the last chunk's delta is empty, as OpenAI's is
    monkeypatch.setattr(server.engine.model, "generate", replying("\nuser: hi"))
    assert client.chat.completions.create(**ask).choices[0].message.content == ""
    last = list(client.chat.completions.create(**ask, stream=True))[-1].choices[0]
    assert last.delta.content is None and last.finish_reason == "stop"


def test_client_sees_openai_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=NAME, prompt="word " * BLOCK, max_tokens=1)
    assert error.value.code == "context_length_exceeded"


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server, monkeypatch):
    """Megabytes would take seconds to tokenize, holding the GIL. A token is at most
    longest_token() bytes: the tokens of the longest, BLOCK - 1 times, fit; a byte more cannot."""
    longest = max(range(tokenizer.VOCAB_SIZE), key=lambda i: len(tokenizer.decode_bytes([i])))
    text = tokenizer.decode([longest]) * (BLOCK - 1)
    assert len(tokenizer.encode(text)) == BLOCK - 1  # what makes the bound tight
    status, payload = raw(server, "POST", "/v1/completions", {**GOOD, "prompt": text})
    assert status == 200 and payload["usage"]["prompt_tokens"] == BLOCK - 1

    encode, decode, sizes = tokenizer.encode, tokenizer.decode, []
    monkeypatch.setattr(tokenizer, "encode", lambda text, *args: sizes.append(len(text)) or encode(text, *args))
    monkeypatch.setattr(tokenizer, "decode", lambda ids: sizes.append(len(ids)) or decode(ids))
    for path, body in [("/v1/completions", {**GOOD, "prompt": text + "x"}),
                       ("/v1/completions", {**GOOD, "prompt": ["x", text + "x"]}),
                       ("/v1/completions", {**GOOD, "prompt": [1] * BLOCK}),
                       ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": text}]})]:
        status, payload = raw(server, "POST", path, body)
        assert (status, payload["error"]["code"], payload["error"]["param"]) == (
            400, "context_length_exceeded", "messages" if "chat" in path else "prompt")
    assert max(sizes) < BLOCK  # only the "x" was tokenized


def test_a_list_of_prompts_is_refused_at_the_first_that_cannot_fit(server, monkeypatch):
    """Not after tokenizing them all: 900 such prompts of 32 KB took 27 s."""
    too_long = "word " * BLOCK  # its bytes do not tell: only its tokens do
    assert len(too_long.encode()) // sample.longest_token() < BLOCK <= len(tokenizer.encode(too_long))
    encode, encoded = tokenizer.encode, []
    monkeypatch.setattr(tokenizer, "encode", lambda text, *args: encoded.append(text) or encode(text, *args))
    status, payload = raw(server, "POST", "/v1/completions", {**GOOD, "prompt": ["x", too_long, "y", too_long]})
    assert (status, payload["error"]["code"], payload["error"]["param"]) == (400, "context_length_exceeded", "prompt")
    assert encoded == ["x", too_long]


def test_a_prompt_of_exactly_the_context_is_refused_and_one_token_less_is_served(server):
    """A prompt filling the context leaves no room for a completion: it got an empty "length" one."""
    def chat(words):
        return {"model": NAME, "max_tokens": 1, "messages": [{"role": "user", "content": " word" * words}]}
    words = next(k for k in range(BLOCK) if len(tokenizer.encode(sample.chat_prompt(chat(k)["messages"]))) == BLOCK)
    assert len(tokenizer.encode(" word" * BLOCK)) == BLOCK  # a token each: the check by bytes lets it through
    for path, full, short, param in [("/v1/completions", {**GOOD, "prompt": " word" * BLOCK},
                                      {**GOOD, "prompt": " word" * (BLOCK - 1)}, "prompt"),
                                     ("/v1/chat/completions", chat(words), chat(words - 1), "messages")]:
        status, payload = raw(server, "POST", path, full)
        assert status == 400 and (payload["error"]["code"], payload["error"]["param"]) == (
            "context_length_exceeded", param)
        status, payload = raw(server, "POST", path, short)
        assert status == 200 and payload["usage"]["prompt_tokens"] == BLOCK - 1


def test_token_ids_must_lie_below_the_vocabulary_size(server):
    """Id VOCAB_SIZE (a row of the padded embeddings, no token) was a 500 with a traceback."""
    status, payload = raw(server, "POST", "/v1/completions", {**GOOD, "prompt": [tokenizer.VOCAB_SIZE]})
    assert (status, payload["error"]["code"], payload["error"]["param"]) == (400, "invalid_value", "prompt")
    status, payload = raw(server, "POST", "/v1/completions", {**GOOD, "prompt": [tokenizer.VOCAB_SIZE - 1]})
    assert status == 200 and payload["usage"]["prompt_tokens"] == 1


# ---------------------------------------------------------------- raw HTTP errors

def test_head_gets_the_headers_of_get_and_the_connection_stays_usable(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request("HEAD", "/health")
    response = conn.getresponse()
    assert response.status == 200 and int(response.headers["Content-Length"]) > 0 and response.read() == b""
    conn.request("HEAD", "/v1/completions")  # a POST route: its 405, headers only
    response = conn.getresponse()
    assert (response.status, response.headers["Allow"], response.read()) == (405, "POST", b"")
    conn.request("GET", "/health")  # the same connection: nothing of a body was left on it
    response = conn.getresponse()
    assert response.status == 200 and "queued" in json.loads(response.read())
    conn.close()


GOOD = {"model": NAME, "prompt": "x", "max_tokens": 1}


@pytest.mark.parametrize("method, path, body, status, code", [
    ("POST", "/v1/completions", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"model": "nano-test", "prompt": "x", "temperature": NaN}', 400,
     "invalid_json"),
    ("POST", "/v1/completions", [1, 2], 400, "invalid_json"),
    ("POST", "/v1/completions", b"", 400, "invalid_json"),
    ("GET", "/v1/nothing", None, 404, "unknown_url"),
    ("GET", "/v1/completions", None, 405, "method_not_allowed"),
    ("OPTIONS", "/v1/completions", None, 405, "method_not_allowed"),
    ("POST", "/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model_not_found"),
    ("POST", "/v1/completions", {"prompt": "x"}, 400, "missing_required_parameter"),
    ("POST", "/v1/completions", {**GOOD, "max_tokens": "ten"}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "max_tokens": 1.5}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "temperature": 3}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "n": 0}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "stop": 7}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "prompt": [[1, 99999]]}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "logprobs": 1}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {**GOOD, "presence_penalty": 0.5}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {**GOOD, "response_format": {"type": "json_object"}}, 400,
     "unsupported_parameter"),
    ("POST", "/v1/completions", {**GOOD, "best_of": 2}, 400, "unsupported_parameter"),
    # vLLM's fields, which vLLM clients send: dropped, they were other answers than asked for
    ("POST", "/v1/completions", {**GOOD, "top_k": 1}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {**GOOD, "stop_token_ids": [13]}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {**GOOD, "ignore_eos": True}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {**GOOD, "top_k": False}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {**GOOD, "model": [NAME]}, 400, "invalid_value"),  # was a 404 model_not_found
    ("TRACE", "/v1/models", None, 501, "bad_request"),  # http.server's own refusal: was HTML
    ("POST", "/v1/completions", {**GOOD, "n": True}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "stream": "yes"}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "stream_options": "yes"}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "stop": [str(i) for i in range(sample.MAX_STOPS + 1)]}, 400,
     "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "prompt": [[-1]]}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "prompt": ["x"] * (sample.MAX_ROWS // sample.MAX_N + 1),
                                 "n": sample.MAX_N}, 400, "invalid_value"),
    ("POST", "/v1/completions", {**GOOD, "prompt": [1] * BLOCK}, 400, "context_length_exceeded"),
    ("POST", "/v1/completions", {**GOOD, "prompt": "word " * BLOCK}, 400, "context_length_exceeded"),
    ("POST", "/v1/chat/completions", {"model": NAME}, 400, "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                      "tools": [{"type": "function"}]}, 400, "unsupported_parameter"),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "echo": True},
     400, "unsupported_parameter"),
])
def test_bad_requests_get_openai_error_bodies(server, method, path, body, status, code):
    got, payload = raw(server, method, path, body)
    error = payload["error"]
    assert got == status and error["code"] == code
    assert isinstance(error["message"], str) and error["message"] and error["type"]


def test_a_connection_survives_an_error(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    for body, status in [(b"{broken", 400), (json.dumps(GOOD), 200), (json.dumps({**GOOD, "n": -1}), 400),
                         (json.dumps(GOOD), 200)]:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == status
        json.loads(response.read())
    conn.close()


def test_a_client_that_resets_its_connection_is_gone_not_a_traceback(server):
    """A client killed, or closing with an answer unread, resets its connection: the read of
    the next request line raised, and socketserver printed its traceback, --quiet or not."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        conn, address = listener.accept()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # linger 0: a reset
    with conn:
        sample.Handler(conn, address, server)  # handles the connection, here in this thread


def test_bodies_without_a_usable_length_are_refused(server):
    status, payload = raw(server, "POST", "/v1/completions", b"",
                          headers={"Content-Length": str(sample.MAX_BODY + 1)})
    assert (status, payload["error"]["code"]) == (413, "bad_content_length")
    status, payload = raw(server, "POST", "/v1/completions", b"", headers={"Transfer-Encoding": "chunked"})
    assert (status, payload["error"]["code"]) == (411, "length_required")


def test_unsupported_fields_at_their_defaults_are_accepted(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "logprobs": False,
            "tools": [], "logit_bias": {}, "presence_penalty": 0, "response_format": {"type": "text"}, "echo": False,
            "top_k": -1, "min_p": 0.0, "repetition_penalty": 1, "ignore_eos": False, "stop_token_ids": []}
    assert raw(server, "POST", "/v1/chat/completions", body)[0] == 200


def test_logprobs_zero_is_refused_for_it_asks_for_the_sampled_tokens_logprobs(server):
    """OpenAI's completions answer logprobs: 0 with each sampled token's logprob, which this server never sends."""
    status, payload = raw(server, "POST", "/v1/completions", {**GOOD, "logprobs": 0})
    assert status == 400 and (payload["error"]["code"], payload["error"]["param"]) == (
        "unsupported_parameter", "logprobs")
    assert raw(server, "POST", "/v1/completions", {**GOOD, "logprobs": None})[0] == 200


def test_a_trailing_slash_names_the_same_route(server):
    assert raw(server, "GET", "/v1/models/")[1]["data"][0]["id"] == NAME
    assert raw(server, "POST", "/v1/completions/", GOOD)[0] == 200


def test_a_model_named_like_a_folder_is_found_by_its_name(server, monkeypatch):
    """--ckpt=out/phi1_hf/ (a tab-completed folder) is the default name: GET /v1/models/out/phi1_hf/ was a 404."""
    monkeypatch.setattr(server, "model_name", "out/phi1_hf/")
    assert raw(server, "GET", "/v1/models/out/phi1_hf/") == (200, raw(server, "GET", "/v1/models")[1]["data"][0])
    assert raw(server, "GET", "/v1/models/out/phi1_hf")[0] == 404


def test_health(server):
    assert raw(server, "GET", "/health") == (200, {"status": "ok", "model": NAME, "queued": 0})


# ---------------------------------------------------------------- the script

def cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_prints_the_prompt_and_its_completion(ckpt, reference):
    prompt = "def square(x):"
    done = cli(f"--ckpt={ckpt}", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=10")
    assert done.returncode == 0, done.stderr
    assert done.stdout == prompt + expect(reference, prompt, 10)[0] + "\n"


def test_cli_samples_are_seeded_clamped_and_num_samples_many(ckpt, reference, capsys):
    prompt = "def f(x):"
    cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", "--num_samples=2", "--max_new_tokens=1000"])
    cfg.prompt = prompt
    sample.print_samples(cfg, reference)
    ids = tokenizer.encode(prompt)
    max_new = BLOCK - len(ids)  # what the context leaves
    outs = reference.generate([ids, ids], max_new, cfg.temperature, cfg.top_p, [],
                              derived_seed(sample.COMMAND_LINE_SEED, 0))
    samples = [prompt + sample.cut(new, max_new, ())[0] + "\n" for new in outs]
    out, err = capsys.readouterr()
    assert out == ("-" * 40 + "\n").join(samples)
    assert err == (f"note: --max_new_tokens=1000 cut to {max_new}, the room the {len(ids)}-token prompt leaves "
                   f"in the model's context of {BLOCK}\n")


def test_cli_samples_go_max_batch_at_a_time(ckpt, reference, capsys, monkeypatch):
    """--num_samples=2000000 went to generate() at once: a traceback out of memory."""
    rows, real_generate = [], GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, p, *a: rows.append(len(p)) or real_generate(self, p, *a))
    cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", "--num_samples=5", "--max_batch=2",
                                               "--max_new_tokens=3", "--temperature=1"])
    cfg.prompt = "x ="
    sample.print_samples(cfg, reference)
    assert rows == [2, 2, 1] and capsys.readouterr().out.count("-" * 40 + "\n") == 4
    rows.clear()
    cfg.num_samples = 2
    sample.print_samples(cfg, reference)  # one batch: the samples of the same seed as before
    outs = real_generate(reference, [tokenizer.encode("x =")] * 2, 3, 1.0, 1.0, [],
                         derived_seed(sample.COMMAND_LINE_SEED, 0))
    assert capsys.readouterr().out == ("-" * 40 + "\n").join("x =" + sample.cut(new, 3, ())[0] + "\n" for new in outs)


def test_cli_neighbouring_seeds_share_no_samples(ckpt, reference, capsys):
    """Batch b drew with seed + b: --seed=1338's first sample was --seed=1337's second."""
    def samples(seed: int) -> list[str]:
        cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", "--num_samples=2", "--max_batch=1",
                                                   "--max_new_tokens=8", "--temperature=1", f"--seed={seed}"])
        cfg.prompt = "x ="
        sample.print_samples(cfg, reference)
        return capsys.readouterr().out.split("-" * 40 + "\n")
    first, second = samples(1337), samples(1338)
    assert len(set(first + second)) == 4


def test_a_prompt_from_standard_input_is_read_as_strictly_as_a_file(ckpt, monkeypatch):
    import io
    cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", "--prompt_file=-"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("def f(\u00e9):".encode())))
    assert sample.read_prompt(cfg) == "def f(\u00e9):"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc\xff")))  # was read as U+FFFD
    with pytest.raises(UserError, match="cannot read --prompt_file=-: 'utf-8' codec"):
        sample.read_prompt(cfg)
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed: was an AttributeError
    with pytest.raises(UserError, match="standard input is closed"):
        sample.read_prompt(cfg)


def test_a_prompt_file_and_standard_input_read_alike_without_a_bom(ckpt, tmp_path, monkeypatch):
    """A BOM was kept (3 junk tokens), and standard input kept the \\r\\n a file reads as \\n."""
    import io
    data = "\ufeffdef f():\r\n    pass\r\n".encode()
    (tmp_path / "p.py").write_bytes(data)
    for name in (tmp_path / "p.py", "-"):
        cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", f"--prompt_file={name}"])
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        assert sample.read_prompt(cfg) == "def f():\n    pass\n"


def test_cli_says_which_dtype_overflowed(ckpt):
    """float16 activations past its range: a traceback from torch's sampler, or token 0 over and over."""
    model = GPT.from_checkpoint(ckpt).half()
    with torch.no_grad():  # each fits float16, their sum does not
        model.layers[0].attn_out_bias.fill_(60000)
        model.layers[0].mlp_out_bias.fill_(60000)
    for temperature in (0, 0.8):
        cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}", f"--temperature={temperature}",
                                                   "--max_new_tokens=4"])
        with pytest.raises(UserError, match=r"NaN or infinite in float16 .* \(--dtype=float32\)"):
            sample.print_samples(cfg, model)


def test_cli_refuses_a_prompt_that_fills_the_context(ckpt, reference):
    cfg, _ = parse_args(sample.DEFAULTS, argv=[f"--ckpt={ckpt}"])
    cfg.prompt = " x" * BLOCK
    assert len(tokenizer.encode(cfg.prompt)) == BLOCK
    with pytest.raises(UserError, match="context holds"):
        sample.print_samples(cfg, reference)


@pytest.mark.parametrize("args, message", [
    (["--device=cuda:99"], "--device=cuda:99, but this machine has"),
    (["--device=banana"], "unknown --device=banana"),
    (["--seed=1.5"], "--seed must be an integer"),
    (["--prompt=x", "--prompt_file=p.txt"], "give --prompt or --prompt_file, not both"),  # --prompt was dropped
    (["--port=9000"], "--port is a setting of --serve, not of the command line"),  # were ignored without a word
    (["--serve", "--num_samples=4"], "--num_samples is a setting of the command line, not of --serve"),
    # past the waits' limit: the first request ended the batching thread, every one after hung
    (["--serve", "--batch_wait_ms=1e300"], "--batch_wait_ms must be in [0, 60000]"),
])
def test_bad_settings_are_one_line(ckpt, monkeypatch, args, message):
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--ckpt={ckpt}", *args])
    with pytest.raises(UserError, match=re.escape(message)):
        sample.main()


def test_serve_refuses_an_empty_host():
    """An empty --host would listen on every interface, for a server without authentication."""
    for host in ("", " "):
        cfg, _ = parse_args(sample.DEFAULTS, argv=["--serve", f"--host={host}"])
        with pytest.raises(UserError, match="--host must name an address"):
            sample.check_settings(cfg)


@pytest.mark.parametrize("content", [None, b"not a checkpoint"])
def test_cli_bad_checkpoint_is_one_line_and_exit_2(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    done = cli(f"--ckpt={path}")
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: cannot load --ckpt={path}") and done.stderr.count("\n") == 1


def test_serve_on_a_busy_port_is_one_line_and_exit_2(ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = cli(f"--ckpt={ckpt}", "--serve", f"--port={busy.getsockname()[1]}")
    assert done.returncode == 2
    assert "already in use" in done.stderr and done.stderr.count("\n") == 1


def test_serve_answers_then_stops_on_sigterm(ckpt):
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--ckpt={ckpt}", "--serve", "--port=0",
                             "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", line).group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == str(ckpt)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


SLOW_SERVER = """
import time, torch
import model
real = model.sample
square = torch.randn(500, 500)
def slow(*args):  # 50 ms a token, spent in torch, as a real model's thread spends its time
    start = time.perf_counter()
    while time.perf_counter() - start < 0.05:
        square @ square
    return real(*args)
model.sample = slow
import config, sample
config.run(sample.main)
"""


def test_a_stopped_server_finishes_the_running_batch_alone(ckpt):
    """The engine ran every batch it had taken off the queue in that round, one after the
    other (requests of other temperatures batch apart): seconds each, past a supervisor's
    grace time, where those not begun should get a 503."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, f"--ckpt={ckpt}", "--serve", "--port=0",
                             "--batch_wait_ms=500"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", proc.stdout.readline()).group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)

        def status(temperature):
            try:
                client.completions.create(model=str(ckpt), prompt="def", max_tokens=30, temperature=temperature)
                return 200
            except openai.APIStatusError as e:
                return e.status_code

        with ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(status, t) for t in (0.5, 0.6, 0.7)]  # one round: three batches
            time.sleep(1.0)  # past the batch wait: the first batch is running
            proc.send_signal(signal.SIGTERM)
            assert sorted(a.result() for a in answers) == [200, 503, 503]
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("signals", [1, 2])
def test_a_stopped_server_sends_the_answer_it_is_making_unless_stopped_twice(ckpt, reference, signals):
    """The running batch was waited for 30 s, then its answers dropped: minutes on a CPU. And
    the second signal's exit ran the interpreter's teardown under the engine's thread, inside
    torch: "terminate called without an active exception", SIGABRT."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, f"--ckpt={ckpt}", "--serve", "--port=0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", proc.stdout.readline()).group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.completions.create, model=str(ckpt), prompt="def", max_tokens=40,
                                 temperature=0)
            time.sleep(1.0)  # the batch is running
            for _ in range(signals):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
            if signals == 1:
                assert answer.result().choices[0].text == expect(reference, "def", 40)[0]
                assert proc.wait(timeout=30) == 0
            else:
                assert proc.wait(timeout=5) == 130
                with pytest.raises(openai.APIConnectionError):
                    answer.result()
        assert "stopping: the requests being answered (1) are finished and sent first; Ctrl-C again to quit" \
            in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
