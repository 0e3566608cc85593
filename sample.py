"""Sample from a checkpoint on the command line, or serve it as an OpenAI-compatible API.

    python sample.py --ckpt=out/ckpt.pt --prompt='def fib(n):' --max_new_tokens=64
    python sample.py --ckpt=microsoft/phi-1 --prompt_file=p.py --temperature=0 --stop='\\ndef,\\nclass'
    python sample.py --ckpt=out/ckpt.pt --serve --port=8000    # http://127.0.0.1:8000/v1

On the command line it prints the prompt and its completion, --num_samples times.
The prompt is taken as written, where --stop reads escapes: for a newline in it, use
bash's --prompt=$'def f():\\n' or --prompt_file.
With --serve, a standard-library HTTP server speaks OpenAI's wire format, so any
OpenAI client (the official one, llm.py, evaluate.py --api-base) can use the model:

    GET  /v1/models, /v1/models/{id}   the one model, named --model_name (default: --ckpt as given)
    POST /v1/completions               prompt: a string, a list of strings, token ids, or a list of those
    POST /v1/chat/completions          messages, flattened into a prompt by the chat template below
    GET  /health                       {"status": "ok", ...}

Both POST routes take model (required; another name is a 404), max_tokens (chat:
max_completion_tokens too), temperature, top_p, n, stop (a string or a list),
seed, stream and stream_options; completions also take echo. A request that
leaves out max_tokens, temperature, top_p or stop gets the server's
--max_new_tokens, --temperature, --top_p or --stop. Answers carry usage token
counts and a finish_reason per choice: "stop" (end of text, or a stop string,
which is cut from the text) or "length" (max_tokens reached). max_tokens is
clamped to the room the prompt leaves in the context; a prompt that leaves no
room is refused (400, code context_length_exceeded), never silently truncated.
logprobs, suffix, logit_bias, tools, non-zero penalties, a chat's echo and vLLM's
sampling fields (top_k, min_p, stop_token_ids, ...) at other than their neutral
values are refused with a 400 naming the field. stream=true answers in OpenAI's server-sent
events as the tokens come; text that may still turn out to begin a stop string
(its last len(stop) - 1 characters) or an incomplete UTF-8 character waits for
the next token, so the streamed pieces join into exactly the answer without stream.
The stream begins with the first tokens: a request refused before them (a 503 from
a server stopping) gets its HTTP status, as one without stream does.
Errors look like OpenAI's: {"error": {"message", "type", "param", "code"}}. A POST
body needs a Content-Length (else 411); one that stops coming for the connection's
timeout (300 s without a byte) is a 408.

Chat template: each message becomes one "role: content" line (roles system,
developer, user, assistant; a list of content parts contributes its text parts,
joined by newlines), and "assistant:" ends the prompt:

    system: You are a helpful assistant.
    user: Write a function that adds two numbers.
    assistant:

The reply is the continuation up to "\\nsystem:", "\\ndeveloper:", "\\nuser:" or
"\\nassistant:" (or a stop of the request), less the one space after the colon.
phi-1 never saw chats in training: the template is plain text a code model continues.

Batching: one thread owns the model. Request threads put their rows (each prompt
n times) on a queue; the generation thread takes whatever arrives within
--batch_wait_ms of the first, up to --max_batch rows, groups the rows that share
temperature, top_p and stop strings (generate() takes one of each per batch), and
runs one generate() per group, each row to its own max_tokens. A row is answered
as soon as it ends, not when its batch does (streamed, its finish event goes out
at once; else its request is answered once its other rows are), and a batch ends
with its last row. Greedy output does not depend on batching (up to rounding in
near-ties, more likely in bfloat16). Sampled rows in one batch draw from one
random stream, so a request with a seed is reproducible when its rows make a
batch of their own (it came alone, or nothing queued with it shares its
temperature, top_p and stop); in a batch shared with other requests its samples
depend on theirs. Without a seed, sampling is random: the server draws the seeds of
such batches from --seed if given, else from the OS, so a restarted server does not
repeat the samples of the one before.

A client that hangs up (a dropped stream, a timed-out request that llm.py would
send again) cancels its rows: those still queued are dropped, and a running batch
stops at its next token once every row in it is cancelled or answered; one that
still has unfinished rows of other requests runs on for them, with the same
answers as without.

Ctrl-C or SIGTERM stops the server: it takes no more requests, the running
batch finishes and its answers are sent (however long that takes; a second
Ctrl-C or SIGTERM quits at once), and the requests not begun get a 503.

There is no authentication: the server listens on 127.0.0.1 (this machine) by
default; --host=0.0.0.0 opens it to the network.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import queue
import random
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

import torch

import tokenizer
from config import UserError, parse_settings, require, run
from model import GPT, GREEDY_BELOW, derived_seed, load_model, pick_device, pick_dtype

DEFAULTS = dict(
    ckpt="out/ckpt.pt",  # our .pt checkpoint, a Hugging Face phi folder, or a hub id (microsoft/phi-1)
    prompt='def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',  # the text to continue
    prompt_file="",  # read the prompt from this file instead ("-": standard input; UTF-8, \r\n read as \n)
    max_new_tokens=256,  # tokens to generate at most (served: the default max_tokens)
    temperature=0.8,  # 0 is greedy (served: the default temperature)
    top_p=0.95,  # nucleus sampling probability mass (served: the default top_p)
    num_samples=1,  # completions of the prompt to print
    seed=None,  # sampling seed (unset: 1337 on the command line; served, a fresh one from the OS each start)
    stop="",  # stop strings, comma-separated, escapes \n \t \\ \, (e.g. "\ndef,\nclass"); served: the default
    device="auto",  # auto, cpu, cuda, cuda:1, ...
    dtype="auto",  # auto (bfloat16 on GPUs that have it, else float16; float32 on CPUs), float32, bfloat16, float16
    serve=False,  # serve an OpenAI-compatible HTTP API instead of printing samples
    host="127.0.0.1",  # address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 is everyone (no auth)
    port=8000,  # port to listen on (0: a free one, printed at start)
    model_name="",  # the model id the API serves (empty: --ckpt as given)
    max_batch=16,  # most rows (prompts x n, or --num_samples) generated together
    batch_wait_ms=10.0,  # how long to wait for more requests to batch with the first
    quiet=False,  # no log line per request
)

SERVE_ONLY = ("host", "port", "model_name", "batch_wait_ms", "quiet")
COMMAND_LINE_ONLY = ("prompt", "prompt_file", "num_samples")
CHAT_ROLES = ("system", "developer", "user", "assistant")
CHAT_STOPS = tuple(f"\n{role}:" for role in CHAT_ROLES)  # a line starting a new turn ends the reply
COMMAND_LINE_SEED = 1337  # without --seed, the command line prints the same samples every run
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; HumanEval's conventions use 5)
MAX_N = 128  # completions per prompt
MAX_ROWS = 2048  # prompts x n per request
MAX_BODY = 32 << 20  # bytes of one request body
POLL_S = 0.1  # how often a handler waiting for its rows looks whether its client has hung up
UNSUPPORTED = ("suffix", "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice",
               "functions", "function_call")
# vLLM's sampling fields, taken only at values that change nothing: a vLLM client's top_k=1 (greedy)
# or stop_token_ids, silently dropped, would be other answers than it asked for
NEUTRAL = {"top_k": (None, 0, -1), "min_p": (None, 0), "repetition_penalty": (None, 1), "min_tokens": (None, 0),
           "ignore_eos": (None, False), "include_stop_str_in_output": (None, False),
           "use_beam_search": (None, False), "stop_token_ids": (None, [])}


# ---------------------------------------------------------------- shared by both modes

def parse_stop(text: str) -> list[str]:
    """--stop's comma-separated strings; \\n, \\t, \\\\ and \\, stand for newline, tab, \\ and ','."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\", ",": ","}
    stops, current, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] in escapes:
            current += escapes[text[i + 1]]
            i += 2
            continue
        if text[i] == ",":
            stops.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    return [s for s in stops + [current] if s]


def sampling_mode(temperature: float, top_p: float) -> tuple[float, float]:
    """(temperature, top_p) for generate(): a near-zero temperature or top_p is greedy,
    written (0, 1) so that all greedy requests share one batching key."""
    if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW:
        return 0.0, 1.0
    return float(temperature), float(top_p)


def cut(ids: list[int], max_new: int, stops) -> tuple[str, str]:
    """The text of new tokens up to the first stop string, and OpenAI's finish_reason.

    generate() drops <|endoftext|>, so fewer than max_new tokens and no stop
    string means the text ended: "stop" as well."""
    text = tokenizer.decode(ids)
    kept = tokenizer.cut_at_stop(text, stops)
    if len(kept) < len(text):
        return kept, "stop"
    return text, "length" if len(ids) >= max_new else "stop"


# ---------------------------------------------------------------- command line

def read_prompt(cfg) -> str:
    """--prompt as written, or --prompt_file's text, read alike from a file or standard input:
    strict UTF-8 less a BOM (else junk tokens), newlines as text mode reads them (\\r\\n as \\n)."""
    if not cfg.prompt_file:
        return cfg.prompt
    try:
        if cfg.prompt_file != "-":
            data = Path(cfg.prompt_file).read_bytes()
        elif sys.stdin is None:  # started with standard input closed
            raise OSError("standard input is closed")
        else:
            data = sys.stdin.buffer.read()
        return data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompt_file={cfg.prompt_file}: {e}") from None


def print_samples(cfg, model: GPT) -> None:
    """Print --num_samples completions of the prompt, each after the prompt itself."""
    prompt = read_prompt(cfg)
    ids = tokenizer.encode(prompt) or [tokenizer.EOT]  # an empty prompt starts a new document
    block = model.config.block_size
    if len(ids) >= block:
        raise UserError(f"the prompt has {len(ids)} tokens, and the model's context holds {block} "
                        f"with at least one new token")
    max_new = min(cfg.max_new_tokens, block - len(ids))
    if max_new < cfg.max_new_tokens:  # the output shows no cut: say it
        print(f"note: --max_new_tokens={cfg.max_new_tokens} cut to {max_new}, the room the {len(ids)}-token "
              f"prompt leaves in the model's context of {block}", file=sys.stderr, flush=True)
    stops = parse_stop(cfg.stop)
    temperature, top_p = sampling_mode(cfg.temperature, cfg.top_p)
    seed = COMMAND_LINE_SEED if cfg.seed is None else cfg.seed
    for start in range(0, cfg.num_samples, cfg.max_batch):  # --max_batch at a time: memory, and output as it comes
        rows = min(cfg.max_batch, cfg.num_samples - start)
        seeded = derived_seed(seed, start // cfg.max_batch)
        try:
            outs = model.generate([ids] * rows, max_new, temperature, top_p, stops, seeded)
        except FloatingPointError as e:  # float16 overflowing: --dtype's to change
            raise UserError(str(e)) from None
        for i, new in enumerate(outs):
            if start + i:
                print("-" * 40)
            print(prompt + cut(new, max_new, stops)[0], flush=True)


# ---------------------------------------------------------------- requests

class ApiError(Exception):
    """A request the server refuses: an HTTP status and the body OpenAI would send."""

    def __init__(self, message: str, status: int = 400, code: str | None = "invalid_value",
                 param: str | None = None, type: str = "invalid_request_error", headers=()):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json(raw: bytes) -> dict:
    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(f"could not parse the JSON body of the request ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("the JSON body of the request must be an object", code="invalid_json")
    return body


def number(body: dict, key: str, default, low, high=None, integer: bool = False):
    """body[key] if present, checked to be a number in [low, high], else default."""
    value = body.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
            or value < low or (high is not None and value > high)):
        what = "an integer" if integer else "a number"
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise ApiError(f"'{key}' must be {what} {bounds}, not {value!r}", param=key)
    return value


def flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(f"'{key}' must be true or false, not {value!r}", param=key)
    return bool(value)


@dataclass
class Sampling:
    """How a request wants its completions generated."""
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last event with the usage


def parse_sampling(body: dict, cfg, chat: bool) -> Sampling:
    """The sampling fields of a request; the server's settings fill in what it leaves out."""
    for key in UNSUPPORTED + (("echo",) if chat else ()):  # chat has no prompt to echo
        value = body.get(key)
        if not (value is None or value is False or value == "" or value == [] or value == {}):
            raise ApiError(f"'{key}' is not supported by this server", param=key,
                           code="unsupported_parameter")
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if value is not None and (value not in neutral or isinstance(value, bool) != isinstance(neutral[-1], bool)):
            raise ApiError(f"'{key}' is not supported by this server (only {json.dumps(neutral[-1])})", param=key,
                           code="unsupported_parameter")
    for key in ("presence_penalty", "frequency_penalty"):
        if number(body, key, 0, -2, 2) != 0:
            raise ApiError(f"'{key}' is not supported by this server (only 0)", param=key,
                           code="unsupported_parameter")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError("only the text response_format is supported", param="response_format",
                       code="unsupported_parameter")
    newer = chat and body.get("max_completion_tokens") is not None  # chat's newer name for max_tokens
    max_tokens = number(body, "max_completion_tokens" if newer else "max_tokens", cfg.max_new_tokens, 0,
                        integer=True)
    temperature = number(body, "temperature", cfg.temperature, 0, 2)
    top_p = number(body, "top_p", cfg.top_p, 0, 1)
    n = number(body, "n", 1, 1, MAX_N, integer=True)
    if body.get("best_of") not in (None, n):
        raise ApiError("'best_of' is not supported by this server (only equal to n)", param="best_of",
                       code="unsupported_parameter")
    seed = number(body, "seed", None, -2**63, 2**64 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stops = parse_stop(cfg.stop)
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise ApiError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("'stream_options' must be an object", param="stream_options")
    if options and not flag(body, "stream"):
        raise ApiError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    temperature, top_p = sampling_mode(temperature, top_p)
    return Sampling(max_tokens, temperature, top_p, n, tuple(sorted({s for s in stops if s})), seed,
                    flag(body, "stream"), flag(options, "include_usage"))


@functools.cache
def longest_token() -> int:
    """Bytes of the longest token (128): a text of B bytes is at least B / longest_token() tokens."""
    return max(len(tokenizer.decode_bytes([i])) for i in range(tokenizer.VOCAB_SIZE))


def too_long(block: int, tokens, param: str) -> ApiError:
    return ApiError(f"This model's maximum context length is {block} tokens, and the prompt has {tokens}: "
                    f"no room for a completion (prompts are not truncated)", param=param,
                    code="context_length_exceeded")


def encode_to_fit(text: str, block: int, param: str) -> list[int]:
    """text's tokens, refused if they cannot fit the context: first by its bytes, before
    tokenizing it (megabytes take seconds, holding the GIL), then by its tokens. (A lone
    surrogate is 3 bytes here and in the tokens.)"""
    tokens = -(-len(text.encode(errors="surrogatepass")) // longest_token())
    if tokens >= block:
        raise too_long(block, f"at least {tokens}", param)
    ids = tokenizer.encode(text)  # "<|endoftext|>" in a prompt is plain text
    if len(ids) >= block:
        raise too_long(block, len(ids), param)
    return ids


def parse_prompts(body: dict, n: int, block: int) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt of a completions request. Tokenizing is the slow
    part: too many prompts are refused before any is tokenized, and one that cannot fit
    the context before it is (if its bytes tell) or right after, before the next one."""
    prompt = body.get("prompt")

    def is_ids(x):
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise ApiError("'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                       "lists of token ids", param="prompt")
    if len(prompts) * n > MAX_ROWS:
        raise ApiError(f"at most {MAX_ROWS} completions (prompts x n) per request", param="n")
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = encode_to_fit(p, block, "prompt")  # before the next prompt is tokenized
        elif len(p) >= block:
            raise too_long(block, len(p), "prompt")
        elif all(0 <= t < tokenizer.VOCAB_SIZE for t in p):
            ids, p = p, tokenizer.decode(p)
        else:
            raise ApiError(f"token ids must lie in 0..{tokenizer.VOCAB_SIZE - 1}", param="prompt")
        out.append((ids or [tokenizer.EOT], p))  # an empty prompt starts a new document
    return out


def chat_prompt(messages) -> str:
    """Messages flattened by the chat template of the module docstring."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    lines = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            raise ApiError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {role!r}",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                             and isinstance(part.get("text"), str) for part in content):
            content = "\n".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
        lines.append(f"{role}: {content}")
    return "\n".join(lines) + "\nassistant:"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------- the generation thread

@dataclass(eq=False)
class Row:
    """One completion to generate; its future receives the new token ids as soon as the
    row ends. A streamed row also puts (row, token) on `tokens` as each comes, then (row, None)."""
    prompt: list[int]
    max_new: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    request: int  # which request it belongs to
    tokens: queue.Queue | None = None  # the request's stream, shared by its rows
    streamed: int = 0  # tokens put on it so far
    cancelled: bool = False  # its client hung up: the engine drops it, or stops once the rest are answered
    future: Future = field(default_factory=Future)

    def push(self, token: int) -> None:
        if self.tokens is not None:
            self.streamed += 1
            self.tokens.put((self, token))

    def finish(self, ids: list[int] | None = None, error: Exception | None = None) -> None:
        if error is None:
            self.future.set_result(ids)
        else:
            self.future.set_exception(error)
        if self.tokens is not None:
            self.tokens.put((self, None))


def shutting_down() -> ApiError:
    """What a request the server will not begin gets once it is stopping."""
    return ApiError("the server is shutting down", 503, "unavailable", type="server_error")


class Cancelled(Exception):
    """Nobody waits for the rest of the work (a client hung up): raised to stop it."""


def cancel(rows: list[Row]) -> None:
    """Their client hung up: the engine drops them, or stops once the rest are answered."""
    for row in rows:
        row.cancelled = True


_CLOSE = object()  # queued by Engine.close


class Engine:
    """The one thread that runs the model, batching the rows of concurrent requests."""

    def __init__(self, model: GPT, max_batch: int, batch_wait_ms: float, seed: int | None = None):
        self.model, self.max_batch, self.wait = model, max_batch, batch_wait_ms / 1000
        self.block_size = model.config.block_size
        self.queue: queue.Queue = queue.Queue()  # one list of rows per request
        # seeds for batches that have no seed of their own; seed None draws from the OS, so a
        # restarted server does not repeat the samples of the last one
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.closed = False
        self.largest_batch = 0  # the most rows one generate() call has taken
        self.thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        with self.lock:
            if self.closed:
                raise shutting_down()
            self.queue.put(rows)

    def close(self) -> None:
        """Take no more rows, fail the queued ones, and wait for the running batch."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            while True:  # their 503s now, not after the running batch (minutes, on a CPU)
                try:
                    for row in self.queue.get_nowait():
                        row.finish(error=shutting_down())
                except queue.Empty:
                    break
            self.queue.put(_CLOSE)
        self.thread.join()

    def _loop(self) -> None:
        carry = None  # a request taken from the queue that did not fit the last batch
        while True:
            first = carry if carry is not None else self.queue.get()
            carry = None
            if first is _CLOSE:
                return
            rows, deadline = list(first), time.monotonic() + self.wait
            while len(rows) < self.max_batch:
                try:
                    more = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is _CLOSE or len(rows) + len(more) > self.max_batch:
                    carry = more
                    break
                rows += more
            groups: dict[tuple, list[Row]] = {}
            for row in rows:
                groups.setdefault((row.temperature, row.top_p, row.stop), []).append(row)
            for group in groups.values():
                # a batch's index counts the batches of its request, not the group's: a seeded request
                # whose rows make a batch of their own draws as it would alone on the server
                made = Counter()
                for batch in self._split(group):
                    i = made[batch[0].request]
                    made.update({row.request for row in batch})
                    batch = [row for row in batch if not row.cancelled]  # hung up on while queued
                    if batch and self.closed:  # stopping: the batch running then finishes, no other
                        for row in batch:
                            row.finish(error=shutting_down())
                    elif batch:
                        self._generate(batch, i)

    def _split(self, rows: list[Row]) -> list[list[Row]]:
        """Batches of at most max_batch rows whose longest prompt and longest max_new fit the context."""
        batches, batch, longest, most = [], [], 0, 0
        for row in rows:
            t, m = max(longest, len(row.prompt)), max(most, row.max_new)
            if batch and (len(batch) == self.max_batch or t + m > self.block_size):
                batches.append(batch)
                batch, t, m = [], len(row.prompt), row.max_new
            batch.append(row)
            longest, most = t, m
        return batches + [batch]

    def _generate(self, batch: list[Row], index: int) -> None:
        first = batch[0]
        if first.seed is not None and all(row.request == first.request for row in batch):
            seed = derived_seed(first.seed, index)  # a request batched alone: reproducible
        else:
            seed = self.rng.randrange(2**63)
        self.largest_batch = max(self.largest_batch, len(batch))
        out: list[list[int]] = [[] for _ in batch]
        live = 0  # the rows before it are answered or cancelled

        def on_token(i: int, token: int | None) -> None:
            """Push the token, or answer the row at its end; stop generate() once every row
            is answered or cancelled. (One with rows left runs on: generate() cannot drop a
            row, and a step costs as much without it.)"""
            nonlocal live
            if token is None:
                batch[i].finish(out[i])
            else:
                out[i].append(token)
                batch[i].push(token)
            while batch[live].cancelled or batch[live].future.done():  # for good: scanned once per batch
                live += 1
                if live == len(batch):
                    raise Cancelled

        try:
            self.model.generate([row.prompt for row in batch], [row.max_new for row in batch], first.temperature,
                                first.top_p, list(first.stop), seed, on_token=on_token)
        except Cancelled:  # nobody waits for the rest
            return
        except Exception as e:  # e.g. out of memory: fail this batch's unanswered rows, keep serving
            traceback.print_exc()
            error = ApiError(f"generation failed ({type(e).__name__}: {e})", 500, "generation_failed",
                             type="server_error")
            for row in batch:
                if not row.future.done():
                    row.finish(error=error)


# ---------------------------------------------------------------- the HTTP server

class Server(ThreadingHTTPServer):
    """A thread per connection, all handing their rows to one Engine."""
    daemon_threads = True
    request_queue_size = 128  # connections the OS holds while we accept

    def __init__(self, cfg):
        self.address_family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        # binds now, so a busy port fails at once; listens once the model is loaded (start), so
        # that a client trying meanwhile is refused, not held unanswered in the backlog
        super().__init__((cfg.host, cfg.port), Handler, bind_and_activate=False)
        try:
            self.server_bind()
        except OSError:
            self.server_close()
            raise
        self.cfg = cfg
        self.engine: Engine | None = None
        self.model_name = ""
        self.block_size = 0
        self.created = int(time.time())
        self.request_ids = itertools.count()
        self.busy = 0  # requests being answered
        self.idle = threading.Condition()  # notified as each ends

    def start(self, model: GPT, model_name: str) -> None:
        """Serve model under model_name (call serve_forever next)."""
        self.model_name, self.block_size = model_name, model.config.block_size
        longest_token()  # a fraction of a second: now, not in the first request
        self.engine = Engine(model, self.cfg.max_batch, self.cfg.batch_wait_ms, self.cfg.seed)
        self.server_activate()

    def close(self) -> None:
        """Take no more connections, close the engine, then wait until the handlers have sent
        its answers and 503s: the process exits next, and their (daemon) threads with it.
        No time limit (a batch of long answers on a CPU takes minutes): a KeyboardInterrupt
        (a second Ctrl-C or SIGTERM) ends the wait."""
        self.server_close()
        if self.engine is not None:
            self.engine.close()
        with self.idle:
            self.idle.wait_for(lambda: self.busy == 0)


class Handler(BaseHTTPRequestHandler):
    """One connection: read a request, queue its rows, answer in OpenAI's format."""
    protocol_version = "HTTP/1.1"  # keep-alive, so clients reuse their connections
    disable_nagle_algorithm = True  # headers and body go out at once, not after the client's delayed ACK
    server_version = "phi1-sample"
    default_request_version = "HTTP/1.0"  # what a refused request line is answered in (HTTP/0.9 has no status line)
    timeout = 300  # seconds before an idle connection is dropped
    server: Server

    ROUTES = {"/v1/models": ("GET", "models"), "/v1/completions": ("POST", "completions"),
              "/v1/chat/completions": ("POST", "chat"), "/health": ("GET", "health")}

    def handle_one_request(self) -> None:
        """A client that resets the connection (killed, or closing with an answer unread) while
        its next request line or headers are read is gone, not a server error: no traceback."""
        try:
            super().handle_one_request()
        except ConnectionError:
            self.close_connection = True

    def dispatch(self) -> None:
        """Answer one request, counted busy meanwhile so that Server.close waits for it; not
        while its body comes in: a client slow to send it, or that never does, holds up no
        shutdown."""
        raw = self.read_body()  # always, so the next request on this connection starts clean
        if raw is None:
            return
        with self.server.idle:
            self.server.busy += 1
        try:
            self.answer(raw)
        finally:
            with self.server.idle:
                self.server.busy -= 1
                self.server.idle.notify_all()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = dispatch  # JSON errors, not HTML

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, another method, headers too long)
        in OpenAI's JSON too, not HTML; the connection closes after them."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self.send_json(code, ApiError(message or self.responses.get(code, ("error",))[0], code, "bad_request").body)

    def answer(self, raw: bytes) -> None:
        try:
            full_path = unquote(urlsplit(self.path).path)  # a model's name may end in "/" (a folder)
            path = full_path.rstrip("/")
            if path.startswith("/v1/models/"):
                method, name = "GET", "one_model"
            elif path in self.ROUTES:
                method, name = self.ROUTES[path]
            else:
                raise ApiError(f"Invalid URL ({self.command} {path or '/'})", 404, "unknown_url")
            if self.command != method and not (self.command == "HEAD" and method == "GET"):  # HEAD: GET's headers
                raise ApiError(f"{path} takes {method}, not {self.command}", 405, "method_not_allowed",
                               headers=[("Allow", method)])
            if name == "one_model":
                answer = self.one_model(full_path.removeprefix("/v1/models/"))
            elif method == "POST":
                answer = getattr(self, name)(parse_json(raw))
            else:
                answer = getattr(self, name)()
            if answer is not None:  # None: already sent as a stream
                self.send_json(200, answer)
        except Cancelled:
            self.close_connection = True
            self.log_message('"%s" cancelled: the client hung up', self.requestline)
        except ApiError as e:
            self.send_json(e.status, e.body, e.headers)
        except Exception as e:
            traceback.print_exc()
            self.close_connection = True
            self.send_json(500, ApiError(f"internal error ({type(e).__name__}: {e})", 500, "internal_error",
                                         type="server_error").body)

    def read_body(self) -> bytes | None:
        """The request's body; None when there is none to answer (the refusal is sent here,
        a client gone is logged) and the connection closes."""
        length = 0
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or (
                    self.command == "POST" and self.headers.get("Content-Length") is None):
                raise ApiError("send the body with a Content-Length (chunked bodies are not supported)", 411,
                               "length_required")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                raise ApiError(f"bad Content-Length (at most {MAX_BODY} bytes)", 413 if length > 0 else 400,
                               "bad_content_length")
            try:
                raw = self.rfile.read(length) if length else b""
            except TimeoutError:
                raise ApiError(f"the request body stopped coming for {self.timeout} s", 408,
                               "request_timeout") from None
        except ApiError as e:
            self.close_connection = True
            self.send_json(e.status, e.body, e.headers)
            return None
        except OSError:  # reset
            raw = b""
        if len(raw) < length:
            self.close_connection = True
            self.log_message('"%s" dropped: the client hung up before its body was in', self.requestline)
            return None
        return raw

    def send_json(self, status: int, obj: dict, headers=()) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers:
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client went away
            self.close_connection = True

    def send_events(self, events: Iterator[dict], rows: list[Row]) -> None:
        """Server-sent events as OpenAI streams them, each as soon as it is made, then
        [DONE]; the connection closes after. Nothing is sent before the first event (it
        comes with the first tokens): a request refused until then (the server stopping,
        a generation failing) gets its HTTP status, as one not streamed does, and clients
        retry a 503. A generation that fails later ends the stream with an error event, as
        OpenAI's do. A write that fails (the client hung up) cancels the rows."""
        first = next(events)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for event in itertools.chain([first], events):
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
            except ApiError as e:
                self.wfile.write(f"data: {json.dumps(e.body)}\n\n".encode())
        except OSError:
            cancel(rows)
        self.close_connection = True

    def results(self, rows: list[Row]) -> list[list[int]]:
        """The rows' new tokens, once all are generated. A client that hangs up meanwhile
        cancels them: nobody would read them, and llm.py would ask again on its timeout."""
        futures = [row.future for row in rows]
        while wait(futures, timeout=POLL_S).not_done:
            if self.hung_up():
                cancel(rows)
                raise Cancelled
        return [future.result() for future in futures]

    def hung_up(self) -> bool:
        """Whether the client has closed its end of the connection (HTTP clients do not
        half-close while they wait for an answer). It is peeked at, not read: bytes there
        begin the next request of a keep-alive client; none yet, it is still waiting."""
        sock, timeout = self.connection, self.connection.gettimeout()
        sock.settimeout(0)  # not select(): it fails on descriptors past 1023
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:  # e.g. reset
            return True
        finally:
            sock.settimeout(timeout)

    def log_message(self, format, *args) -> None:
        if not self.server.cfg.quiet:
            super().log_message(format, *args)

    # ------------------------------------------------------------ routes

    def health(self) -> dict:
        return {"status": "ok", "model": self.server.model_name, "queued": self.server.engine.queue.qsize()}

    def model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "phi1"}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def one_model(self, name: str) -> dict:
        self.check_model(name)
        return self.model_card()

    def check_model(self, name) -> None:
        if name is None:
            raise ApiError("you must provide a model parameter", param="model",
                           code="missing_required_parameter")
        if not isinstance(name, str):
            raise ApiError("'model' must be a string", param="model")
        if name != self.server.model_name:
            raise ApiError(f"The model `{name}` does not exist; this server has `{self.server.model_name}`",
                           404, "model_not_found", param="model")

    def submit(self, prompts: list[list[int]], s: Sampling, stop: tuple[str, ...]) -> list[Row]:
        """n rows per prompt (each known to fit the context), prompt-major, handed to the
        engine; streamed, they share one queue."""
        block, request = self.server.block_size, next(self.server.request_ids)
        tokens = queue.Queue() if s.stream else None
        rows = []
        for ids in prompts:
            max_new = min(s.max_tokens, block - len(ids))
            rows += [Row(ids, max_new, s.temperature, s.top_p, stop, s.seed, request, tokens)
                     for _ in range(s.n)]
        self.server.engine.submit(rows)
        return rows

    @staticmethod
    def streamed_texts(rows: list[Row], stop: tuple[str, ...], chat: bool,
                       hung_up=lambda: False) -> Iterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish_reason at a row's end else None) as the rows' tokens come.

        Each piece extends what was given before, and together they make exactly the
        text `cut` gives at the end: text that may still begin a stop string, or is
        an incomplete UTF-8 character (U+FFFD for now), is held back a token. A client
        that hangs up (hung_up()) while the rows wait in the queue, or between two
        tokens, cancels them, as in results()."""
        index = {row: i for i, row in enumerate(rows)}
        ids: dict[Row, list[int]] = {row: [] for row in rows}
        given = dict.fromkeys(rows, 0)  # characters of each row's text given so far
        hold = max(map(len, stop), default=1) - 1
        ended = 0
        while ended < len(rows):
            try:
                row, token = rows[0].tokens.get(timeout=POLL_S)
            except queue.Empty:
                if hung_up():
                    cancel(rows)
                    raise Cancelled from None
                continue
            if token is None:
                ended += 1
                row.future.result()  # raises the engine's ApiError if generation failed
                text, reason = cut(ids[row], row.max_new, stop)
            else:
                ids[row].append(token)
                text, reason = tokenizer.decode(ids[row]), None
                if any(s in text for s in stop):
                    continue  # the row's text is complete: the rest comes with its end
                text = text.rstrip("\ufffd")  # an incomplete last character, for now
                text = text[:max(len(text) - hold, 0)]
            if chat:
                text = text.removeprefix(" ")  # as the answer without stream
            if len(text) > given[row] or reason:
                yield index[row], text[given[row]:], reason
                given[row] = len(text)

    def completions(self, body: dict) -> dict | None:
        self.check_model(body.get("model"))
        s = parse_sampling(body, self.server.cfg, chat=False)
        echo = flag(body, "echo")
        prompts = parse_prompts(body, s.n, self.server.block_size)
        rows = self.submit([ids for ids, _ in prompts], s, s.stop)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.model_name}
        prompt_tokens = sum(len(ids) for ids, _ in prompts)

        def choice(i, text, reason):
            return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

        def chunks():
            for number, (i, text, reason) in enumerate(self.streamed_texts(rows, s.stop, False, self.hung_up)):
                if echo and number == 0:  # the prompts, once generation has begun (send_events)
                    for j in range(len(rows)):
                        yield {**head, "choices": [choice(j, prompts[j // s.n][1], None)]}
                yield {**head, "choices": [choice(i, text, reason)]}
            if s.include_usage:
                yield {**head, "choices": [], "usage": usage(prompt_tokens, sum(r.streamed for r in rows))}

        if s.stream:
            return self.send_events(chunks(), rows)
        outs = self.results(rows)
        choices = []
        for i, (row, new) in enumerate(zip(rows, outs)):
            text, reason = cut(new, row.max_new, s.stop)
            choices.append(choice(i, prompts[i // s.n][1] + text if echo else text, reason))
        used = usage(prompt_tokens, sum(map(len, outs)))
        return {**head, "choices": choices, "usage": used}

    def chat(self, body: dict) -> dict | None:
        self.check_model(body.get("model"))
        s = parse_sampling(body, self.server.cfg, chat=True)
        flat = chat_prompt(body.get("messages"))
        prompt = encode_to_fit(flat, self.server.block_size, "messages")
        stop = tuple(sorted(set(s.stop) | set(CHAT_STOPS)))
        rows = self.submit([prompt], s, stop)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.server.model_name}

        def chunks():
            head["object"] = "chat.completion.chunk"
            for number, (i, text, reason) in enumerate(self.streamed_texts(rows, stop, True, self.hung_up)):
                if number == 0:  # the roles, once generation has begun (send_events)
                    for j in range(len(rows)):
                        yield {**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]}
                yield {**head, "choices": [{"index": i, "delta": {"content": text} if text else {},
                                            "logprobs": None, "finish_reason": reason}]}
            if s.include_usage:
                yield {**head, "choices": [], "usage": usage(len(prompt), sum(r.streamed for r in rows))}

        if s.stream:
            return self.send_events(chunks(), rows)
        outs = self.results(rows)
        choices = []
        for i, (row, new) in enumerate(zip(rows, outs)):
            text, reason = cut(new, row.max_new, stop)
            choices.append({"index": i, "message": {"role": "assistant", "content": text.removeprefix(" ")},
                            "logprobs": None, "finish_reason": reason})
        used = usage(len(prompt), sum(map(len, outs)))
        return {**head, "object": "chat.completion", "choices": choices, "usage": used}


def serve(cfg, device: torch.device, dtype: torch.dtype) -> None:
    """Answer HTTP requests until Ctrl-C or SIGTERM."""
    def cannot_listen(e: OSError) -> UserError:
        hint = " (choose another --port)" if e.errno == errno.EADDRINUSE else ""
        return UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}{hint}")

    try:
        server = Server(cfg)  # before the slow model load, so a busy port fails at once
    except OSError as e:
        raise cannot_listen(e) from None
    try:
        model = load_model(cfg.ckpt, device, dtype)
        name = cfg.model_name or cfg.ckpt
        try:
            server.start(model, name)
        except OSError as e:  # another server bound the port too, and listened on it first
            raise cannot_listen(e) from None
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops as Ctrl-C does
        host, port = server.server_address[:2]
        dtype_name = str(dtype).removeprefix("torch.")
        print(f"serving {name} ({model.num_params():,} parameters, {device}, {dtype_name}) "
              f"at http://{f'[{host}]' if ':' in host else host}:{port}/v1; Ctrl-C stops", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print(f"stopping: the requests being answered ({server.busy}) are finished and sent first; "
                  f"Ctrl-C again to quit now", file=sys.stderr, flush=True)
    finally:
        try:
            server.close()
        except KeyboardInterrupt:  # the second: quit now
            print("interrupted", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # not sys.exit: the interpreter's teardown would run under the engine's thread, still
            # inside torch, and torch's then aborts the process ("terminate called ...")
            os._exit(130)


def check_settings(cfg) -> None:
    require((cfg.max_new_tokens >= 0, "--max_new_tokens must be >= 0"),
            (cfg.temperature >= 0, "--temperature must be >= 0"),
            (0 <= cfg.top_p <= 1, "--top_p must be from 0 to 1"),
            (cfg.num_samples >= 1, "--num_samples must be >= 1"),
            (cfg.max_batch >= 1, "--max_batch must be >= 1"),
            (0 <= cfg.batch_wait_ms <= 60_000, "--batch_wait_ms must be in [0, 60000]"),
            (cfg.host.strip() != "", "--host must name an address (an empty one would listen on every interface; "
                                     "127.0.0.1 is this machine only)"),
            (0 <= cfg.port <= 65535, "--port must be from 0 to 65535"),
            (cfg.seed is None or isinstance(cfg.seed, int) and -2**63 <= cfg.seed < 2**64,
             "--seed must be an integer from -2**63 to 2**64 - 1"),
            (not (cfg.prompt_file and cfg.prompt != DEFAULTS["prompt"]), "give --prompt or --prompt_file, not both"))
    # a setting of the other mode would be ignored without a word
    ignored = [key for key in (COMMAND_LINE_ONLY if cfg.serve else SERVE_ONLY) if getattr(cfg, key) != DEFAULTS[key]]
    if ignored:
        raise UserError(f"--{ignored[0]} is a setting of {'the command line' if cfg.serve else '--serve'}, "
                        f"not of {'--serve' if cfg.serve else 'the command line'}")


def main():
    cfg = parse_settings(DEFAULTS, __doc__)
    check_settings(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.serve:
        serve(cfg, device, dtype)
    else:
        print_samples(cfg, load_model(cfg.ckpt, device, dtype))


if __name__ == "__main__":
    run(main)
