"""A fake OpenAI-compatible server for tests and bench/synth_speed.py: answers that depend
only on the request (a hash of it), faults injected on a schedule, a fixed latency.

    with FakeLLM(faults=["ok", "429", "ok", "drop"], latency=0.01) as server:
        client = llm.Client(server.url, "fake")

The i-th POST gets faults[i % len(faults)]: "ok" (answer), "429" (Retry-After:
server.retry_after), "500", "503" and "408" (retry-after-ms: 10), "slow" (answers after
server.slow seconds), "malformed" (200, not JSON), "nested" (200, JSON nested deeper
than Python parses), "html" (200, a proxy's HTML page),
"empty" (200, no choices), "drop" (closes the connection without answering), "cut"
(closes it half-way through the body), "length" (half the answer, finish_reason
"length", usage counting max_tokens: cut off at max_tokens), "context_full" (the same,
fewer tokens than max_tokens: cut off by the model's context, as sample.py --serve and
llama.cpp with --parallel do), "null" (content null, finish_reason "content_filter"),
"no_usage" (an answer without usage), "filtered" (a 400 from a content filter, its
message naming the request in words) or "context" (vLLM's 400 for a request longer than
its context, the message naming the request's token counts).
Only paths under /v1/ exist: any other is a 404, as on vLLM.
"""

import hashlib
import itertools
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
DUPLICATE = ("Every program is a list of small steps that a computer follows one after another, and "
             "learning to program means learning to split a big problem into such steps, to name them "
             "well, and to test each one before trusting it with the next.")


def digest(body: dict) -> int:
    """A stable number from what the request asks for."""
    keys = ("model", "messages", "prompt", "seed", "temperature", "max_tokens")
    return int(hashlib.sha256(json.dumps([body.get(k) for k in keys], sort_keys=True).encode()).hexdigest(), 16)


def prose(h: int, duplicates: bool = True) -> str:
    """Eighty made-up words; with duplicates, one in 12 answers is DUPLICATE and one in 12 a near copy of it."""
    rng = random.Random(h)
    if duplicates and h % 12 == 0:
        return DUPLICATE
    if duplicates and h % 12 == 1:
        return DUPLICATE + " " + rng.choice(SYLLABLES) * 3
    return " ".join(rng.choice(SYLLABLES) + rng.choice(SYLLABLES) for _ in range(80)) + "."


def exercise(h: int, name: str) -> str:
    """A fenced function called name, valid but for one answer in 8 each of: a syntax error, another
    name, no docstring, a statement after it; one in 8 shows an example with a wrong result."""
    rng = random.Random(h)
    k = rng.randrange(2, 1000)
    words = " ".join(rng.choice(SYLLABLES) + rng.choice(SYLLABLES) for _ in range(4))
    want = 2 * k + 3 + (h % 8 == 4)
    code = (f"def {name}(a: int, b: int) -> int:\n"
            f'    """Return {k} times a plus b, the {words}.\n\n'
            f"    >>> {name}(2, 3)\n    {want}\n"
            f'    """\n    return a * {k} + b\n')
    code = {0: f"def {name}(a, b:\n    return a\n",
            1: code.replace(f"def {name}(", "def something_else("),
            2: code.split('    """')[0] + f"    return a * {k} + b\n",
            3: code + f"\nprint({name}(1, 2))\n"}.get(h % 8, code)
    return f"Here is the exercise.\n\n```python\n{code}```\n"


def answer(body: dict) -> str:
    if "prompt" in body:
        return prose(digest(body))
    last = body["messages"][-1]["content"]
    name = re.search(r"function named `(\w+)`", last)
    return exercise(digest(body), name.group(1)) if name else prose(digest(body))


class FakeLLM(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, faults=("ok",), latency=0.0, slow=1.0, key=None, model="fake", retry_after="0.01",
                 answer=answer, port=0):
        super().__init__(("127.0.0.1", port), Handler)
        self.faults, self.latency, self.slow, self.key, self.model = list(faults), latency, slow, key, model
        self.retry_after, self.answer = retry_after, answer
        self.posts = itertools.count()
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.served: list[str] = []  # the fault (or "ok") of each POST, in arrival order
        self.thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers and body, written apart, wait 40 ms for a delayed ACK
    server: FakeLLM

    def log_message(self, *args):
        pass

    def send(self, status: int, payload, headers=(), content_type="application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (a timeout)
            self.close_connection = True

    def error(self, status: int, message: str, code: str, headers=()) -> None:
        self.send(status, {"error": {"message": message, "type": "error", "param": None, "code": code}}, headers)

    def routed(self) -> bool:
        if not self.path.startswith("/v1/"):
            self.send(404, {"detail": "Not Found"})
            return False
        return True

    def authorized(self) -> bool:
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self.error(401, "Incorrect API key provided.", "invalid_api_key")
            return False
        return True

    def do_GET(self):
        if self.routed() and self.authorized():
            self.send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})

    def do_POST(self):
        s = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.routed() or not self.authorized():
            return
        with s.lock:
            fault = s.faults[next(s.posts) % len(s.faults)]
            s.served.append(fault)
            s.in_flight += 1
            s.most_in_flight = max(s.most_in_flight, s.in_flight)
        try:
            time.sleep(s.latency + (s.slow if fault == "slow" else 0))
        finally:
            with s.lock:  # before answering: the client's next request may follow the answer at once
                s.in_flight -= 1
        self.respond(fault, json.loads(raw))

    def respond(self, fault: str, body: dict) -> None:
        if fault == "429":
            return self.error(429, "Rate limit reached, slow down.", "rate_limit_exceeded",
                              [("Retry-After", self.server.retry_after)])
        if fault == "500":
            return self.error(500, "The server had an error.", "server_error")
        if fault == "503":
            return self.error(503, "Overloaded.", "overloaded", [("retry-after-ms", "10")])
        if fault == "408":
            return self.error(408, "Request timed out.", "timeout", [("retry-after-ms", "10")])
        if fault == "malformed":
            return self.send(200, b'{"choices": [{"message": {"content": "half')
        if fault == "nested":
            return self.send(200, b"[" * 100_000 + b"]" * 100_000)
        if fault == "html":
            return self.send(200, b"<html><head><title>Sign in</title></head><body>Proxy login</body></html>",
                             content_type="text/html")
        if fault == "empty":  # billed all the same
            return self.send(200, {"object": "chat.completion", "choices": [],
                                   "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
        if fault in ("drop", "cut"):
            self.close_connection = True
            if fault == "cut":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"choices": [')
            return
        if body.get("model") != self.server.model:
            return self.error(404, f"The model `{body.get('model')}` does not exist", "model_not_found")
        if body.get("max_tokens") == 0:
            return self.error(400, "max_tokens must be at least 1", "invalid_value")
        prompt_tokens = len(json.dumps(body.get("messages", body.get("prompt")))) // 4
        if fault == "filtered":
            rng = random.Random(digest(body))
            return self.error(400, f"Flagged by the content filter: {rng.choice(SYLLABLES) + rng.choice(SYLLABLES)}.",
                              "content_filter")
        if fault == "context":
            asked = prompt_tokens + (body.get("max_tokens") or 0)
            return self.error(400, f"This model's maximum context length is 1024 tokens. However, you requested "
                                   f"{asked} tokens ({prompt_tokens} in the messages, {body.get('max_tokens')} in "
                                   f"the completion). Please reduce the length of the messages or completion.", 400)
        text, finish = self.server.answer(body), "stop"
        if fault in ("length", "context_full"):
            text, finish = text[:len(text) // 2], "length"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4}
        if fault == "length" and body.get("max_tokens"):  # all it was given
            usage["completion_tokens"] = body["max_tokens"]
        if fault == "context_full":  # fewer, however many it was given
            usage["completion_tokens"] = min(len(text) // 4, (body.get("max_tokens") or 2 ** 20) - 1)
        if fault == "null":
            text, finish = None, "content_filter"
        if self.path.endswith("/chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
        reply = {"id": "x", "object": "chat.completion", "model": self.server.model, "choices": [choice]}
        self.send(200, reply if fault == "no_usage" else {**reply, "usage": usage})


# ---------------------------------------------------------------- the toy pipeline's stand-in teacher

def toy_teacher(body: dict) -> str:
    """What README's toy pipeline asks a teacher: exercises and prose as answer() gives
    them, and educational value judged by a rule a forest can learn from embeddings:
    docstrings and comments per line."""
    asked = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    file = re.search(r"<file>\n(.*)\n</file>", asked, re.S)
    if not file:
        return answer(body)
    lines = file.group(1).splitlines() or [""]
    explained = file.group(1).count('"""') / 2 + sum(line.lstrip().startswith("#") for line in lines)
    score = max(0, min(10, round(50 * explained / len(lines))))  # 6 from 12 per 100 lines
    return f"Judged by the stand-in teacher's rule.\nEducational value: {score}"


if __name__ == "__main__":  # python tests/llm_server.py --port=8012 --model=teacher
    import argparse
    parser = argparse.ArgumentParser(description="the toy pipeline's stand-in teacher (see README)")
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--model", default="teacher")
    args = parser.parse_args()
    try:
        server = FakeLLM(model=args.model, answer=toy_teacher, port=args.port)
    except OSError as e:
        parser.exit(1, f"cannot listen on 127.0.0.1:{args.port}: {e.strerror or e} (choose another --port)\n")
    print(f"stand-in teacher at {server.url}", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:  # Ctrl-C stops it, quietly
        parser.exit(130)
