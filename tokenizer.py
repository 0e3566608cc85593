"""The phi-1 tokenizer (CodeGen's): GPT-2 byte-level BPE plus 38 whitespace tokens.

phi-1 checkpoints use ids 0..50256 of GPT-2's BPE (tiktoken's `r50k_base`,
`<|endoftext|>` = 50256) and 38 added tokens for runs of whitespace, which code
is full of: runs of 31 down to 2 spaces are ids 50257..50286 and runs of 9 down
to 2 tabs are ids 50287..50294. Hugging Face's tokenizer first cuts the added
tokens out of the text (leftmost, longest match) and byte-level-BPEs the pieces
between them, so "    return x" is [4 spaces] "return" " x". We do the same:
a greedy regex finds the whitespace runs (greedy on a run of one character is
leftmost-longest), and tiktoken encodes the rest. Every byte sequence maps to
tokens and back, so decode(encode(text)) == text for any string that UTF-8 can
spell (a lone surrogate such as "\\ud800" cannot: tiktoken encodes it as U+FFFD).

tiktoken downloads r50k_base on first use and caches it in $TIKTOKEN_CACHE_DIR.
Offline, point TIKTOKEN_CACHE_DIR at a folder holding a copy; when it is unset,
a `shared/tiktoken_cache` folder beside this checkout is used if there is one.
"""

from __future__ import annotations

import functools
import operator
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken

from config import UserError

EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50295  # real tokens; model embeddings are padded to 51200 rows
EOT_TEXT = "<|endoftext|>"

MAX_SPACES, MAX_TABS = 31, 9
# id of each added whitespace run, e.g. 31 spaces -> 50257, 2 spaces -> 50286
ADDED = {" " * n: 50257 + MAX_SPACES - n for n in range(MAX_SPACES, 1, -1)}
ADDED |= {"\t" * n: 50287 + MAX_TABS - n for n in range(MAX_TABS, 1, -1)}
ADDED_BYTES = {i: s.encode() for s, i in ADDED.items()}
_RUNS = re.compile(f" {{2,{MAX_SPACES}}}|\t{{2,{MAX_TABS}}}")
_RUNS_OR_EOT = re.compile(f"{re.escape(EOT_TEXT)}| {{2,{MAX_SPACES}}}|\t{{2,{MAX_TABS}}}")


# An offline copy of tiktoken's files beside the checkout, used when nothing else is set.
_OFFLINE_CACHE = Path(__file__).resolve().parent.parent / "shared" / "tiktoken_cache"


@functools.cache
def _bpe() -> tiktoken.Encoding:
    if "TIKTOKEN_CACHE_DIR" not in os.environ and _OFFLINE_CACHE.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(_OFFLINE_CACHE)
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # tiktoken raises whatever its download raised
        raise UserError(f"cannot load tiktoken's r50k_base BPE file ({type(e).__name__}); offline, "
                        f"set TIKTOKEN_CACHE_DIR to a folder holding a copy") from None


def _split(text: str, allowed_special: bool) -> list[tuple[str, int | None]]:
    """Cut text into (piece, None) for BPE and (run, id) for added tokens."""
    pattern = _RUNS_OR_EOT if allowed_special else _RUNS
    parts, start = [], 0
    for m in pattern.finditer(text):
        if m.start() > start:
            parts.append((text[start:m.start()], None))
        run = m.group()
        parts.append((run, EOT if run == EOT_TEXT else ADDED[run]))
        start = m.end()
    if start < len(text):
        parts.append((text[start:], None))
    return parts


def encode(text: str, allowed_special: bool = False) -> list[int]:
    """Token ids of text. With allowed_special, "<|endoftext|>" becomes EOT;
    without (the default, safe for untrusted documents) it is ordinary text."""
    ids: list[int] = []
    bpe = _bpe()
    for piece, token in _split(text, allowed_special):
        if token is None:
            ids.extend(bpe.encode_ordinary(piece))
        else:
            ids.append(token)
    return ids


def encode_batch(texts: list[str], allowed_special: bool = False,
                 num_threads: int = 8) -> list[list[int]]:
    """encode() of many texts on a pool of threads (tiktoken releases the GIL).

    Whole texts go to the threads: code splits into so many small pieces that
    handing the pieces to tiktoken's own batch call is several times slower."""
    if len(texts) < 2 or num_threads < 2:
        return [encode(t, allowed_special) for t in texts]
    with ThreadPoolExecutor(num_threads) as pool:
        return list(pool.map(lambda t: encode(t, allowed_special), texts))


def decode_bytes(ids) -> bytes:
    bpe, out, run = _bpe(), [], []
    for i in ids:
        i = operator.index(i)  # numpy's and torch's integers too; a float is refused, not truncated
        if i in ADDED_BYTES:
            if run:
                out.append(bpe.decode_bytes(run))
                run = []
            out.append(ADDED_BYTES[i])
        elif 0 <= i <= EOT:
            run.append(i)
        else:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{VOCAB_SIZE - 1})")
    if run:
        out.append(bpe.decode_bytes(run))
    return b"".join(out)


def decode(ids) -> str:
    """Text of token ids; a cut-off multi-byte character decodes as U+FFFD."""
    return decode_bytes(ids).decode("utf-8", errors="replace")


def stop_strings(stops) -> list[str]:
    """The stop strings of a `stop` setting: a str is one stop string (iterated, it would
    be one stop per character), a list or tuple several; empty strings stop nothing."""
    stops = [stops] if isinstance(stops, str) else list(stops or [])
    if not all(isinstance(s, str) for s in stops):  # (bytes would iterate as ints)
        raise ValueError(f"stop strings must be str, not {stops!r}")
    return [s for s in stops if s]


def cut_at_stop(text: str, stops) -> str:
    """text up to the first of the stop strings: model.generate() returns the tokens that
    completed one, and their decoded text is cut here."""
    return text[:min((i for i in (text.find(s) for s in stop_strings(stops)) if i >= 0), default=len(text))]
