"""The one HTTP client for LLMs: OpenAI-compatible chat and completions over raw HTTP.

    client = Client("http://127.0.0.1:8000/v1", "gpt-3.5-turbo", concurrency=16, rpm=3500)
    reply = client.chat([{"role": "user", "content": "Hello"}], max_tokens=64)
    reply.text, reply.usage, reply.finish_reason
    for key, result in client.map(enumerate(list_of_messages), max_tokens=64):
        ...  # result: a Reply, or a Failure; in the order they complete

Any OpenAI-compatible server works: OpenAI, vLLM, llama.cpp, Ollama, sample.py --serve.
The endpoint is api_base, else $OPENAI_BASE_URL, else OpenAI's; the key is api_key,
else $OPENAI_API_KEY, sent as a bearer token (local servers need none).

Why not the SDK: this file is all the robustness a long synthesis or annotation run
needs, in one readable place, with nothing to install:

- at most `concurrency` requests in flight across all threads;
- client-side limits of `rpm` requests and `tpm` tokens a minute, as token buckets
  holding one second's worth (a request counts as its characters / 4 plus max_tokens,
  corrected by the usage its reply reports);
- retried, up to max_retries times: connection errors (refused, dropped), timeouts
  (the whole answer, headers and body, must come within `timeout` seconds of asking;
  behind an HTTP proxy, only its body and each wait for a byte of the headers),
  429, 5xx, 408, 409, and replies that are not JSON or lack the text. The wait doubles from
  `backoff` seconds (up to max_backoff), jittered down to half; a Retry-After (or
  retry-after-ms) header sets it instead, capped at max_backoff and jittered up by a fifth
  (a server asking for an hour would otherwise stall the run without a word), and after a
  429 holds every thread's next request until then;
- not retried: other 4xx, and a reply whose text is null (a refusal, a content filter),
  which fails as "refused" too, a verdict on what was asked; the request fails with the
  server's message (a 404 also names the URL asked), and a reply of more than MAX_REPLY
  (64 MiB), a bad_response read no further. 401, 403, 404, a 429 for exhausted
  quota, a redirect (3xx: not followed, it names where to) and a malformed URL are `fatal`:
  a wrong key, model or URL fails every request the same way, so callers should stop;
- map() that ends early (the caller breaks off or raises, Ctrl-C) returns at once: its
  requests start and retry no more, and those in flight are left to end in daemon
  threads, which do not hold up the program's exit;
- `stop`, an Event: once set (a caller's Ctrl-C), requests outside map() start and retry
  no more, leaving their waits at once, and fail as "stopped";
- a request that fails for good raises LLMError from chat() and complete(), and is a
  Failure in map();
- `stats`: requests, retries, failed attempts and final failures by kind, tokens in
  and out, and the cost at price_in / price_out USD per million tokens. Replies without
  token counts (some servers send none) are counted apart, and warned about once: the
  tokens and cost shown leave them out.

check() sends one GET /models, without retries, so that an unreachable endpoint, a
redirect, a refused key or a model the server does not list fail at once with one clear line
(a server without /models passes, and its first request tells). The model must be one
of the ids listed, as written there (Ollama lists "llama3:latest", not "llama3").
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import os
import queue
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field, replace

import requests
import requests.adapters
import urllib3

DEFAULT_API_BASE = "https://api.openai.com/v1"

# The client's settings as scripts take them from the command line (config.py):
# synth.py and filter.py put these into their own DEFAULTS and call client_from(cfg).
DEFAULTS = dict(
    api_base="",  # OpenAI-compatible endpoint (default $OPENAI_BASE_URL, else OpenAI); key: $OPENAI_API_KEY
    concurrency=8,  # requests in flight at most
    rpm=0,  # requests per minute at most, client side (0: no limit)
    tpm=0,  # tokens per minute at most, client side (0: no limit)
    timeout=120.0,  # seconds to wait for an answer before retrying
    max_retries=6,  # retries of a request on connection errors, timeouts, 408, 409, 429, 5xx and malformed replies
    backoff=1.0,  # seconds before the first retry, doubling after each (with jitter)
    price_in=0.0,  # USD per million prompt tokens, for the cost shown
    price_out=0.0,  # USD per million completion tokens
)
FATAL_STATUS = (401, 403, 404)  # wrong key, no access, wrong model or URL: every request would fail
TRANSIENT_4XX = (408, 409)  # the server timed out reading the request; a conflict (OpenAI's SDK retries both)
# bytes of a reply, decoded, at most: the longest answers (128k tokens, each a few bytes, JSON-escaped
# at worst 6 a character) take a few MiB, so a server sending more (a gzip bomb, a body without end)
# is broken, and would send as much again: kept whole, it took the memory of the machine
MAX_REPLY = 64 << 20
FAILED_ALIKE = 5  # requests in a row that failed alike (Failure.alike): the request or endpoint is at fault
# how OpenAI ("maximum context length"), vLLM, sample.py --serve and llama.cpp ("exceeds the
# available context size") refuse a prompt too long for the model
TOO_LONG = re.compile(r"context (length|size|window)", re.IGNORECASE)


@dataclass
class Reply:
    text: str
    usage: dict | None  # prompt_tokens, completion_tokens; None where the server reports no counts
    finish_reason: str | None  # "stop", "length", ...


@dataclass
class Failure:
    kind: str  # connection, timeout, rate_limit, server, bad_response, refused, or stopped (map() ended, or stop)
    message: str
    status: int | None = None  # the HTTP status, if one came
    attempts: int = 1
    fatal: bool = False  # every request would fail the same way: stop

    def __str__(self) -> str:
        status = f" {self.status}" if self.status else ""
        return f"{self.kind}{status}: {self.message}"

    def alike(self, other: Failure) -> bool:
        """Whether two requests failed the same way: the same kind and status, and for a
        refusal the same message but for its numbers (vLLM's names each request's token counts),
        since a refusal in other words is about its own request (a content filter, say)."""
        masked = lambda f: re.sub(r"\d+", "#", f.message) if f.kind == "refused" else ""  # noqa: E731
        return (self.kind, self.status, masked(self)) == (other.kind, other.status, masked(other))

    @property
    def too_long(self) -> bool:
        """A refusal of a prompt too long for the model's context (with max_tokens): asked
        again as it is, it is refused again."""
        return self.kind == "refused" and bool(TOO_LONG.search(self.message))


class LLMError(Exception):
    """A request that failed for good; .failure says how."""

    def __init__(self, failure: Failure):
        super().__init__(str(failure))
        self.failure = failure


@dataclass
class Stats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    errors: Counter = field(default_factory=Counter)  # failed attempts, by kind
    failures: Counter = field(default_factory=Counter)  # requests that failed for good, by kind
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0  # USD, at price_in / price_out per million tokens
    no_usage: int = 0  # replies without token counts: left out of the tokens and the cost


class _Failed(Exception):
    """One attempt that failed: whether to try again, and how long the server asked us to wait."""

    def __init__(self, failure: Failure, retry: bool, retry_after: float | None = None, usage: dict | None = None):
        super().__init__(str(failure))
        self.failure, self.retry, self.retry_after = failure, retry, retry_after
        self.usage = usage  # the tokens of an answer refused after all (billed as any other)


class _Bucket:
    """A token bucket: per_minute units a minute, at most one second's worth saved up.
    A take larger than that waits for a full bucket and leaves it in debt."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60
        self.capacity = self.level = max(1.0, self.rate)
        self.time = time.monotonic()

    def take(self, amount: float, now: float) -> float:
        """Reserve amount now; returns the seconds to wait before using it."""
        self.level = min(self.capacity, self.level + (now - self.time) * self.rate)
        self.time = now
        need = min(amount, self.capacity)
        wait = max(0.0, (need - self.level) / self.rate)
        self.level -= amount
        return wait

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


def client_from(cfg, model: str) -> "Client":
    """The client a script's settings ask for (DEFAULTS above, as parsed by config.py);
    a bad setting is a UserError, one line for the user."""
    from config import UserError, require
    # each request in flight holds a thread and a socket: past 1024, the usual limit on open files
    # (ulimit -n) fails connections, threads run out (ulimit -u, a container's), and no API's rate
    # limit is that generous to one client
    require((1 <= cfg.concurrency <= 1024, "--concurrency must be from 1 to 1024"),
            (cfg.rpm >= 0 and cfg.tpm >= 0, "--rpm and --tpm must be >= 0"),
            (0 < cfg.timeout <= 86400, "--timeout must be > 0 and at most 86400 s (a day)"),
            (cfg.max_retries >= 0, "--max_retries must be >= 0"),
            (cfg.backoff >= 0, "--backoff must be >= 0"),
            (cfg.price_in >= 0 and cfg.price_out >= 0, "--price_in and --price_out must be >= 0"))
    try:
        return Client(cfg.api_base or None, model, concurrency=cfg.concurrency, rpm=cfg.rpm or None,
                      tpm=cfg.tpm or None, timeout=cfg.timeout, max_retries=cfg.max_retries,
                      backoff=cfg.backoff, price_in=cfg.price_in, price_out=cfg.price_out)
    except ValueError as e:
        raise UserError(str(e)) from None


class Client:
    """A thread-safe client for one model at one OpenAI-compatible endpoint (see the module doc)."""

    def __init__(self, api_base: str | None = None, model: str = "", api_key: str | None = None,
                 concurrency: int = 8, rpm: float | None = None, tpm: float | None = None,
                 timeout: float = 60.0, max_retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0,
                 price_in: float = 0.0, price_out: float = 0.0):
        base = (api_base or os.environ.get("OPENAI_BASE_URL") or DEFAULT_API_BASE).rstrip("/")
        if not re.match(r"https?://[^/]", base):
            raise ValueError(f"the API base must be an http:// or https:// URL, not {base!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout > 0 and backoff >= 0")
        self.api_base, self.model, self.concurrency = base, model, concurrency
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.price_in, self.price_out = price_in, price_out
        key = (os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key).strip()  # a pasted newline
        bad = re.search(r"[\x00-\x1f\x7f-\x9f]|[^\x00-\xff]", key)  # control or not Latin-1: no header carries it
        if bad:
            source = "$OPENAI_API_KEY" if api_key is None else "the API key"
            raise ValueError(f"{source} holds {bad.group()!r} at character {bad.start() + 1}, which an HTTP "
                             f"header cannot carry; check what was pasted")
        self.headers = {"User-Agent": "phi1-llm", **({"Authorization": f"Bearer {key}"} if key else {})}
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._rpm = _Bucket(rpm) if rpm else None
        self._tpm = _Bucket(tpm) if tpm else None
        self._resume_at = 0.0  # after a 429 with Retry-After, no request starts before this
        self._stats = Stats()
        self._local = threading.local()  # per thread: its requests.Session; in map()'s, map's stop event
        self.stop = threading.Event()  # set: requests outside map() start and retry no more (module doc)
        self._sessions: list[requests.Session] = []  # those of the caller's threads, closed by close()

    # ------------------------------------------------------------ the API

    def chat(self, messages: list[dict], **params) -> Reply:
        """POST /chat/completions; params (max_tokens, temperature, seed, ...) go into the body."""
        return self._request("/chat/completions", {"model": self.model, **params, "messages": messages},
                             _chat_reply)

    def complete(self, prompt: str, **params) -> Reply:
        """POST /completions, for base models (a prompt to continue, not a chat)."""
        return self._request("/completions", {"model": self.model, **params, "prompt": prompt}, _completion_reply)

    def map(self, requests_, **params):
        """Yield (key, Reply | Failure) for each (key, messages or prompt) of requests_, in
        the order they complete: messages (a list) go to chat(), a prompt (a string) to
        complete(). An item may hold a third value, params of its own (a seed), which
        take the place of map's. requests_ is read lazily, a few ahead of the answers.

        The requests run in daemon threads of this call, each with a Session of its own
        that it closes when it ends (a Session is not documented as thread-safe). Not a
        ThreadPoolExecutor: the program's exit waits for its threads, and closing a Session
        does not abort a request in flight, so Ctrl-C would wait out every request running
        (up to the timeout, times the retries)."""

        def one(key, payload, own=None):
            try:
                ask = self.complete if isinstance(payload, str) else self.chat
                return key, ask(payload, **{**params, **(own or {})})
            except LLMError as e:
                return key, e.failure

        def work():
            self._local.stop = stop
            with _watched_session() as self._local.session:
                while not stop.is_set() and (job := jobs.get()) is not None:
                    try:
                        done.put(one(*job))
                    except Exception as e:  # a bug: raised to map's caller
                        done.put(e)

        jobs, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
        items, pending, threads = iter(requests_), 0, []
        try:
            while True:
                for job in items:
                    jobs.put(job)
                    pending += 1
                    if len(threads) < self.concurrency:
                        thread = threading.Thread(target=work, name="llm", daemon=True)
                        try:
                            thread.start()
                        except RuntimeError as e:  # the system's limit on threads: a setting, not a bug
                            from config import UserError
                            raise UserError(f"cannot start thread {len(threads) + 1} of --concurrency="
                                            f"{self.concurrency} ({e}): lower it") from None
                        threads.append(thread)
                    if pending >= 2 * self.concurrency:
                        break
                if not pending:
                    break
                result = done.get()
                pending -= 1
                if isinstance(result, Exception):
                    raise result
                yield result
        finally:  # also when the caller stops early: no waiting for the requests in flight
            stop.set()
            for _ in threads:
                jobs.put(None)
        for thread in threads:  # all answered: they only close their sessions
            thread.join()

    def check(self) -> None:
        """One GET /models, no retries: raise LLMError if the endpoint is unreachable, redirects,
        refuses the key, or lists models without ours."""
        url, timeout = self.api_base + "/models", min(self.timeout, 10.0)
        deadline = _deadline.at = time.monotonic() + timeout  # the whole list, as for answers
        try:
            with self._session().get(url, headers=self.headers, timeout=timeout, stream=True,
                                     allow_redirects=False) as r:
                r._content = _read_by(r, deadline)
        except _Failed as e:  # a reply past MAX_REPLY
            raise LLMError(e.failure) from None
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise LLMError(Failure("timeout", f"{self.api_base} did not answer within {timeout:g} s")) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as e:  # ValueError: a bad URL
            raise LLMError(Failure("connection", f"cannot reach {self.api_base}: {_why(e)}")) from None
        if r.is_redirect:
            to = urllib.parse.urlsplit(urllib.parse.urljoin(url, r.headers["Location"]))
            if to[:2] == urllib.parse.urlsplit(url)[:2]:  # the same server (/models/, say): its first request tells
                return
            raise LLMError(Failure("refused", _redirected(r, "/models"), r.status_code, fatal=True))
        if r.status_code in (401, 403):
            raise LLMError(Failure("refused", f"{self.api_base} refused the API key ($OPENAI_API_KEY): "
                                   f"{_server_message(r)}", r.status_code, fatal=True))
        try:
            served = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else []
        except (ValueError, KeyError, TypeError):
            served = []
        if served and self.model not in served:
            listed = ", ".join(served[:5]) + (", ..." if len(served) > 5 else "")
            raise LLMError(Failure("refused", f"{self.api_base} has no model {self.model!r} (it lists {listed})",
                                   404, fatal=True))

    @property
    def stats(self) -> Stats:
        """A snapshot of the running totals."""
        with self._lock:
            s = self._stats
            return replace(s, errors=Counter(s.errors), failures=Counter(s.failures))

    def close(self) -> None:
        for session in self._sessions:
            session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ one request, with retries

    def _request(self, path: str, payload: dict, parse) -> Reply:
        stop = getattr(self._local, "stop", self.stop)
        payload = {k: v for k, v in payload.items() if v is not None}
        estimate = len(json.dumps(payload.get("messages", payload.get("prompt")))) / 4 + (
            payload.get("max_tokens") or 0)
        for attempt in range(self.max_retries + 1):
            self._wait_turn(estimate, stop)
            if stop.is_set():
                raise LLMError(Failure("stopped", "stopped before an answer came", attempts=attempt))
            try:
                reply = self._attempt(path, payload, parse)
            except _Failed as e:
                failure = e.failure
                with self._lock:
                    self._stats.errors[failure.kind] += 1
                if e.usage is not None:
                    self._count(Reply("", e.usage, None), estimate)
                if not e.retry or attempt == self.max_retries:
                    break
                if e.retry_after is not None:
                    pause = min(e.retry_after, self.max_backoff) * random.uniform(1.0, 1.2)
                    if failure.kind == "rate_limit":
                        with self._lock:
                            self._resume_at = max(self._resume_at, time.monotonic() + pause)
                else:
                    pause = min(self.max_backoff, self.backoff * 2 ** min(attempt, 60)) * random.uniform(0.5, 1.0)
                with self._lock:
                    self._stats.retries += 1
                stop.wait(pause)
                continue
            self._count(reply, estimate)
            return reply
        failure.attempts = attempt + 1
        with self._lock:
            self._stats.failures[failure.kind] += 1
        raise LLMError(failure)

    def _wait_turn(self, estimate: float, stop: threading.Event) -> None:
        """Sleep until a 429's pause is over and the rate limits have room for this request,
        or until stop is set."""
        with self._lock:
            now = time.monotonic()
            # the limits count from the end of a 429's pause: counted from now, every thread
            # held by it would find room and all would start together when it ends
            start = max(now, self._resume_at)
            wait = 0.0
            if self._rpm:
                wait = max(wait, self._rpm.take(1, start))
            if self._tpm:
                wait = max(wait, self._tpm.take(estimate, start))
            pause = start - now + wait
        if pause > 0:
            stop.wait(pause)

    def _attempt(self, path: str, payload: dict, parse) -> Reply:
        """One HTTP request: the Reply, or _Failed saying whether to retry."""
        url = self.api_base + path
        with self._slots:
            with self._lock:
                self._stats.requests += 1
            deadline = _deadline.at = time.monotonic() + self.timeout
            try:
                with self._session().post(url, json=payload, headers=self.headers, stream=True, allow_redirects=False,
                                          timeout=(min(self.timeout, 10.0), self.timeout)) as r:
                    body = r._content = _read_by(r, deadline)  # r._content: where r.json() and r.text look
            except (requests.Timeout, urllib3.exceptions.TimeoutError):
                raise _Failed(Failure("timeout", f"no answer within {self.timeout:g} s"), True) from None
            except ValueError as e:  # requests' InvalidURL, urllib3's LocationParseError: a malformed URL
                raise _Failed(Failure("refused", f"cannot send to {url}: {e}", fatal=True), False) from None
            except (requests.RequestException, urllib3.exceptions.HTTPError) as e:  # the latter: reading the body
                raise _Failed(Failure("connection", _why(e)), True) from None
        if r.is_redirect:
            raise _Failed(Failure("refused", _redirected(r, path), r.status_code, fatal=True), False)
        if not 200 <= r.status_code < 300:
            message = _server_message(r)
            if r.status_code == 404:  # a wrong model, or a wrong URL
                hint = "" if self.api_base.endswith("/v1") else ": does --api_base end in /v1?"
                message += f" (POST {url}{hint})"
            if r.status_code == 429 and "insufficient_quota" in body.decode("utf-8", "replace"):
                raise _Failed(Failure("refused", message, 429, fatal=True), False)
            kind = ("rate_limit" if r.status_code == 429 else
                    "server" if r.status_code >= 500 or r.status_code in TRANSIENT_4XX else "refused")
            raise _Failed(Failure(kind, message, r.status_code, fatal=r.status_code in FATAL_STATUS),
                          kind != "refused", _retry_after(r.headers))
        obj = None
        try:
            obj = json.loads(body)
            return parse(obj)
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:  # the last: JSON nested deep
            # a reply of a shape we cannot read may still say what it was billed: counted
            raise _Failed(Failure("bad_response", f"not an answer ({type(e).__name__}: {str(e)[:100]}): "
                                  f"{body[:100]!r}", r.status_code), True,
                          usage=_usage(obj) if isinstance(obj, dict) else None) from None

    def _count(self, reply: Reply, estimate: float) -> None:
        if reply.usage is None:  # the estimate stays charged to the tokens-a-minute bucket
            with self._lock:
                self._stats.no_usage += 1
                first = self._stats.no_usage == 1
            if first:  # else the cost would read $0.00 as if it were known
                print(f"warning: {self.api_base} reports no token usage: the tokens and cost shown leave out "
                      f"its replies", file=sys.stderr, flush=True)
            return
        tokens_in, tokens_out = reply.usage["prompt_tokens"], reply.usage["completion_tokens"]
        with self._lock:
            s = self._stats
            s.tokens_in += tokens_in
            s.tokens_out += tokens_out
            s.cost += (tokens_in * self.price_in + tokens_out * self.price_out) / 1e6
            if self._tpm:
                self._tpm.give(estimate - tokens_in - tokens_out)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _watched_session()
            with self._lock:
                self._sessions.append(session)
        return session


# ---------------------------------------------------------------- reading replies

_deadline = threading.local()  # .at: the time.monotonic() by which this thread's request must be answered


@contextlib.contextmanager
def _shut_at(sock, deadline: float):
    """Shuts sock down at deadline (time.monotonic()), which ends any read waiting on it;
    yields an Event, set if it came to that. A socket's timeout bounds each wait for a byte,
    not a read that waits for many (a header line, a gzip header's comment)."""
    expired = threading.Event()

    def expire():
        expired.set()
        with contextlib.suppress(OSError):  # closed already
            # not SSLSocket's, which unwraps the TLS the read still uses: it would fail as a bad URL (ValueError)
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    watchdog = threading.Timer(deadline - time.monotonic(), expire)
    watchdog.daemon = True  # one left waiting by a request abandoned in map() must not hold up the exit
    watchdog.start()
    try:
        yield expired
    finally:
        watchdog.cancel()


class _Watched:
    """For urllib3's connections: the status line and headers of a response must come by the
    deadline of this thread's request (_deadline.at), else a watchdog shuts the socket down
    and the wait ends as a read timeout. requests' read timeout bounds only the wait for each
    next byte, so a server dripping header lines would hold a request for hours, and one
    sending "100 Continue" without end (http.client skips each) for ever."""

    def getresponse(self, *args, **kwargs):
        with _shut_at(self.sock, _deadline.at) as expired:
            try:
                response = super().getresponse(*args, **kwargs)
            except (OSError, http.client.HTTPException):  # what reading a socket shut down raises
                if not expired.is_set():
                    raise
        if expired.is_set():  # also where the headers came cut short: they end where the stream does
            raise TimeoutError("no headers by the deadline")  # urllib3 makes it a ReadTimeoutError
        return response


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' own, with _Watched connections (but behind a proxy: its pools are others)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def _watched_session() -> requests.Session:
    """A requests.Session whose requests must get their headers by _deadline.at (_Watched)."""
    session = requests.Session()
    session.mount("http://", _Adapter())
    session.mount("https://", _Adapter())
    # redirects are not followed (fatal, naming where to), and so not looked for: looking, requests
    # read a redirect's body itself, past the deadline and MAX_REPLY that _read_by keeps to
    session.get_redirect_target = lambda response: None
    return session


def _read_by(r: requests.Response, deadline: float) -> bytes:
    """The body of a streamed response, all of it in by deadline (time.monotonic()), else
    requests.Timeout, and at most MAX_REPLY bytes, else _Failed, not to be retried.
    requests' read timeout only bounds the wait for each next byte, so a server (or a proxy)
    that trickles bytes would never time out; checked after each read, the deadline was
    overrun by the read's own wait (twice the timeout, or for ever where one read waits for
    many bytes): a watchdog shuts the socket down at it (_shut_at)."""
    if r.raw.closed:  # read already (a body of none)
        return r.content
    chunks, size = [], 0
    # the response's socket, by a descriptor of our own: its connection forgets the socket (.sock is
    # None) where the body runs to the close, and a proxy's TLS within TLS wraps it in no socket
    try:
        descriptor = os.dup(r.raw.fileno())
    except OSError as e:  # no descriptor left (ulimit -n): as a connection that failed, retried
        raise requests.ConnectionError(e) from None
    with socket.socket(fileno=descriptor) as sock, _shut_at(sock, deadline) as expired:
        try:
            while chunk := r.raw.read1(1 << 16, decode_content=True):  # what has come, not a full 64 KiB
                size += len(chunk)
                if size > MAX_REPLY:
                    raise _Failed(Failure("bad_response", f"{r.url} sent more than {MAX_REPLY >> 20} MiB, "
                                          f"which no answer comes near", r.status_code), False)
                chunks.append(chunk)
        except (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException):  # reading a socket shut down
            if not expired.is_set():
                raise
    if expired.is_set():
        raise requests.Timeout()
    return b"".join(chunks)


def _usage(body: dict) -> dict | None:
    """The reply's token counts, or None where the server reports none (or not as integers)."""
    usage = body.get("usage")
    counts = {key: usage.get(key) for key in ("prompt_tokens", "completion_tokens")} if isinstance(usage, dict) else {}
    return counts if counts and all(isinstance(v, int) for v in counts.values()) else None


def _chat_reply(body: dict) -> Reply:
    choice = body["choices"][0]
    message = choice["message"]
    text = message["content"]
    if text is None:  # a refusal or a content filter: asking again would get the same
        why = message.get("refusal") or f"finish_reason {choice.get('finish_reason')}"
        raise _Failed(Failure("refused", f"an answer without text ({str(why)[:300]})", 200), False,
                      usage=_usage(body))
    if not isinstance(text, str):
        raise TypeError("message.content is not a string")
    return Reply(text, _usage(body), choice.get("finish_reason"))


def _completion_reply(body: dict) -> Reply:
    choice = body["choices"][0]
    if not isinstance(choice["text"], str):
        raise TypeError("text is not a string")
    return Reply(choice["text"], _usage(body), choice.get("finish_reason"))


def _server_message(r: requests.Response) -> str:
    """The error message of an OpenAI-style error body, else the start of the body, else the reason."""
    try:
        body = r.json()
        error = body.get("error", body)
        message = error.get("message") or error.get("detail") if isinstance(error, dict) else error
    except (ValueError, AttributeError, RecursionError):
        message = r.text
    message = " ".join(str(message or "").split())[:300]
    return message or f"{r.status_code} {r.reason}"


def _redirected(r: requests.Response, path: str) -> str:
    """Where a redirect of a request for path points. Not followed: requests would ask there with
    a GET in place of the POST (refused, 405, as if for the settings sent), and would leave the
    API key out on the way to another host."""
    to = urllib.parse.urljoin(r.url, r.headers["Location"])
    hint = f"use {to.removesuffix(path)} as --api_base" if to.endswith(path) else "is --api_base right?"
    return f"{r.url} redirects to {to}: {hint}"


def _retry_after(headers) -> float | None:
    """Seconds the server asks for: retry-after-ms, or Retry-After in seconds or as an HTTP date."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) / scale)
        except (KeyError, ValueError):
            pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(headers["retry-after"]).timestamp() - time.time())
    except (KeyError, TypeError, ValueError):
        return None


def _why(e: Exception) -> str:
    """The root cause buried in a requests exception ("Connection refused", ...)."""
    text = str(e)
    # "[Errno 111] Connection refused", RemoteDisconnected('...'), ConnectionResetError(104, '...')
    m = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text) or re.findall(r"\w+\((?:-?\d+, )?(['\"])(.+?)\1\)", text)
    if isinstance(m, re.Match):
        return m.group(1).strip()
    if m:
        return m[-1][1]
    cut = re.search(r"IncompleteRead\((.+?)\)", text)  # "13 bytes read, 987 more expected"
    return f"the reply was cut short ({cut.group(1)})" if cut else text[:200] or type(e).__name__
