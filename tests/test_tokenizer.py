"""Tests for tokenizer.py: the phi-1 / CodeGen tokenizer (GPT-2 BPE + 38 whitespace tokens).

The expected ids are built from tiktoken's plain r50k_base ("the BPE") and from a
Hugging Face `tokenizers.Tokenizer` assembled here from the same ranks, which stands
in for the real microsoft/phi-1 tokenizer.json (we cannot download it).
"""

import keyword
import os

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import tokenizer as tok
from config import UserError
from tokenizer import EOT, VOCAB_SIZE, decode, decode_bytes, encode, encode_batch

BPE = tiktoken.get_encoding("r50k_base")


def bpe(text):
    """Plain GPT-2 BPE ids of text, with no added tokens."""
    return BPE.encode_ordinary(text)


SPACES_31, SPACES_4, SPACES_2 = 50257, 50284, 50286
TABS_9, TABS_2 = 50287, 50294


# --- strategies ---------------------------------------------------------------

def _run(char_and_len):
    char, n = char_and_len
    return char * n


UNICODE_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
_PIECES = [
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True),  # identifiers
    st.sampled_from(keyword.kwlist),
    st.tuples(st.sampled_from(" \t"), st.integers(0, 40)).map(_run),  # indentation
    st.text(" \t", max_size=40),  # mixed tabs and spaces
    st.sampled_from(["\n", "\n\n", "\r\n", "\r", " \n", "\t\n"]),
    st.text("()[]{}:;.,=+-*/%<>!&|^~@#'\"\\`$?", min_size=1, max_size=3),
    st.sampled_from(["'s", "'t", "'re", "'ll", "'d", "'m", "'ve"]),  # GPT-2 contractions
    st.integers(-10**6, 10**9).map(str),
    st.text(st.characters(min_codepoint=0x80, exclude_categories=("Cs",)),
            min_size=1, max_size=4),  # non-ASCII
]
CODE_TEXT = st.lists(st.one_of(_PIECES), max_size=30).map("".join)
# the same, sometimes with the end-of-text marker (and pieces of it) inside
CODE_TEXT_EOT = st.lists(
    st.one_of(*_PIECES, st.sampled_from(["<|endoftext|>", "<|endoftext", "|>", "<|"])),
    max_size=30).map("".join)

PROPERTY = settings(max_examples=200, deadline=None)


# --- 1. added whitespace tokens -------------------------------------------------

def test_added_token_table():
    """Exactly 38 added tokens, ids 50257..50294, the documented end points."""
    assert sorted(tok.ADDED.values()) == list(range(50257, 50295))
    assert tok.ADDED[" " * 31] == SPACES_31 and tok.ADDED["  "] == SPACES_2
    assert tok.ADDED["\t" * 9] == TABS_9 and tok.ADDED["\t\t"] == TABS_2
    assert VOCAB_SIZE == 50295


@pytest.mark.parametrize("n", range(2, 32))
def test_space_run_is_one_token(n):
    """A run of n spaces (2..31) is the single id 50257 + 31 - n."""
    assert encode(" " * n) == [50257 + 31 - n]


@pytest.mark.parametrize("n", range(2, 10))
def test_tab_run_is_one_token(n):
    """A run of n tabs (2..9) is the single id 50287 + 9 - n."""
    assert encode("\t" * n) == [50287 + 9 - n]


def test_single_space_and_tab_use_plain_bpe():
    """A lone space or tab is not an added token: it stays in the BPE."""
    assert encode(" ") == bpe(" ") == [220]
    assert encode("\t") == bpe("\t") == [197]
    assert encode("a b\tc") == bpe("a b\tc")


def test_indented_statement():
    """Indentation is cut out first, so "return" loses its leading space."""
    assert encode("    return x") == [SPACES_4] + bpe("return") + bpe(" x")


def test_long_runs_split_leftmost_longest():
    """Runs past 31 spaces / 9 tabs take the longest token first; a left-over single
    space joins the next word as ordinary BPE."""
    assert encode(" " * 33) == [SPACES_31, SPACES_2]
    assert encode(" " * 32) == [SPACES_31] + bpe(" ")
    assert encode(" " * 32 + "y") == [SPACES_31] + bpe(" y")
    assert encode(" " * 62 + "y") == [SPACES_31, SPACES_31] + bpe("y")
    assert encode(" " * 40) == [SPACES_31, 50257 + 31 - 9]
    assert encode("\t" * 10) == [TABS_9] + bpe("\t")
    assert encode("\t" * 11) == [TABS_9, TABS_2]


def test_mixed_tabs_and_spaces():
    """Tabs and spaces never share a token: each same-character run is cut alone."""
    assert encode("\t  \t\t x") == bpe("\t") + [SPACES_2, TABS_2] + bpe(" x")
    assert encode(" \t \t") == bpe(" \t \t")
    assert encode("\t\t    pass") == [TABS_2, SPACES_4] + bpe("pass")


def test_newline_then_indentation():
    """A newline stays BPE and the indentation after it is one added token."""
    assert encode("def f():\n    return 1\n") == (
        bpe("def f():\n") + [SPACES_4] + bpe("return 1\n"))
    assert encode("\n    \n") == bpe("\n") + [SPACES_4] + bpe("\n")
    assert encode("if x:\n\t\tpass") == bpe("if x:\n") + [TABS_2] + bpe("pass")


def test_trailing_and_inner_spaces():
    """Double spaces inside a line and trailing runs are added tokens too."""
    assert encode("x  =  1") == bpe("x") + [SPACES_2] + bpe("=") + [SPACES_2] + bpe("1")
    assert encode("x   ") == bpe("x") + [50257 + 31 - 3]


# --- 2. <|endoftext|> -------------------------------------------------------------

def test_endoftext_is_ordinary_text_by_default():
    """Untrusted text cannot forge EOT: by default the marker is plain BPE."""
    ids = encode("a<|endoftext|>b")
    assert EOT == 50256
    assert EOT not in ids
    assert ids == bpe("a<|endoftext|>b")
    assert decode(ids) == "a<|endoftext|>b"


def test_endoftext_allowed_special():
    """With allowed_special=True the marker is the single id 50256."""
    assert encode("<|endoftext|>", allowed_special=True) == [EOT]
    assert encode("a<|endoftext|>b", allowed_special=True) == bpe("a") + [EOT] + bpe("b")
    assert encode("  <|endoftext|>  ", allowed_special=True) == [SPACES_2, EOT, SPACES_2]
    assert decode([EOT]) == "<|endoftext|>"


# --- 3. round trip ----------------------------------------------------------------

@PROPERTY
@given(UNICODE_TEXT)
def test_round_trip_unicode(text):
    """decode(encode(s)) == s for any string, with or without special tokens."""
    assert decode(encode(text)) == text
    assert decode(encode(text, allowed_special=True)) == text
    assert decode_bytes(encode(text)) == text.encode()


@PROPERTY
@given(CODE_TEXT_EOT)
def test_round_trip_code(text):
    """decode(encode(s)) == s for code-like text full of whitespace runs."""
    assert decode(encode(text)) == text
    assert decode(encode(text, allowed_special=True)) == text


# --- 4. encode_batch ----------------------------------------------------------------

def test_encode_batch_edge_cases():
    """Empty batch, empty strings and EOT handling match encode()."""
    assert encode_batch([]) == []
    assert encode_batch(["", "", ""]) == [[], [], []]
    texts = ["", "<|endoftext|>", " " * 33, "a", ""]
    for allowed in (False, True):
        assert encode_batch(texts, allowed_special=allowed) == [
            encode(t, allowed_special=allowed) for t in texts]


@settings(max_examples=50, deadline=None)
@given(st.lists(CODE_TEXT_EOT, max_size=8), st.booleans())
def test_encode_batch_matches_encode(texts, allowed):
    """encode_batch(texts) == [encode(t) for t in texts], in order."""
    assert encode_batch(texts, allowed_special=allowed) == [
        encode(t, allowed_special=allowed) for t in texts]


def test_encode_batch_below_two_threads_uses_no_pool(monkeypatch):
    """num_threads 0 or 1, or a single text, encodes in the calling thread."""
    def no_pool(*args, **kwargs):
        raise AssertionError("encode_batch started a thread pool")

    monkeypatch.setattr(tok, "ThreadPoolExecutor", no_pool)
    texts = ["    x", "<|endoftext|>", "a  b"]
    expected = [encode(t) for t in texts]
    assert encode_batch(texts, num_threads=1) == expected
    assert encode_batch(texts, num_threads=0) == expected
    assert encode_batch(texts[:1]) == expected[:1]


# --- 5. id range ---------------------------------------------------------------------

@PROPERTY
@given(st.one_of(UNICODE_TEXT, CODE_TEXT_EOT))
def test_ids_in_vocabulary(text):
    """Every id is in 0..VOCAB_SIZE-1 (so it fits in uint16)."""
    assert all(0 <= i < VOCAB_SIZE for i in encode(text, allowed_special=True))


def test_decode_every_added_id():
    """The last real ids decode to their whitespace runs."""
    assert decode([SPACES_31]) == " " * 31
    assert decode([VOCAB_SIZE - 1]) == "\t\t"
    assert decode(list(range(50257, VOCAB_SIZE))) == "".join(
        sorted(tok.ADDED, key=tok.ADDED.get))


@pytest.mark.parametrize("bad", [VOCAB_SIZE, VOCAB_SIZE + 1, 51199, 2**16, -1, -50256])
def test_decode_rejects_out_of_range(bad):
    """An id outside 0..VOCAB_SIZE-1 raises ValueError, even amid good ids."""
    with pytest.raises(ValueError):
        decode([bad])
    with pytest.raises(ValueError):
        decode([SPACES_2, 64, bad, 65])


def test_decode_takes_numpy_and_torch_ids():
    """Ids from a uint16 token file or a model's output tensor decode like a list,
    added whitespace tokens included (a 0-d tensor is no dict key for its value)."""
    text = "def f():\n    return 1"
    ids = encode(text)
    assert SPACES_4 in ids
    assert decode(np.array(ids, dtype=np.uint16)) == text
    assert decode(torch.tensor(ids)) == text
    for floats in ([220.9, 64.2], np.array(ids, dtype=np.float32)):
        with pytest.raises(TypeError):
            decode(floats)


def test_decode_marks_a_cut_off_character():
    """Tokens that end inside a UTF-8 character decode with one U+FFFD in its place."""
    ids = encode("x🎉")
    assert len(ids) > 2 and decode(ids) == "x🎉"  # the emoji's 4 bytes span several tokens
    assert decode(ids[:-1]) == "x\ufffd"
    assert decode_bytes(ids[:-1]) == "x🎉".encode()[:-1]


# --- 6. equivalence with Hugging Face -------------------------------------------------

def _bytes_to_unicode():
    """GPT-2's map from each byte to a printable character (as in HF's ByteLevel)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # unprintable bytes go to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _bpe_with_ranks_below(token, ranks, limit):
    """The parts tiktoken's BPE makes of token using only merges ranked below limit."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _merges_from_ranks(ranks):
    """GPT-2 merges, in rank order, recovered from tiktoken's mergeable ranks."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _bpe_with_ranks_below(token, ranks, rank)
            assert len(parts) == 2, (token, parts)
            merges.append(tuple(parts))
    return merges


@pytest.fixture(scope="module")
def hf():
    """A Hugging Face tokenizer built like phi-1's tokenizer.json: byte-level BPE on
    GPT-2's vocab and merges, then <|endoftext|> and the 38 whitespace tokens."""
    ranks = BPE._mergeable_ranks
    b2u = _bytes_to_unicode()

    def to_str(b):
        return "".join(b2u[x] for x in b)

    vocab = {to_str(t): r for t, r in ranks.items()} | {"<|endoftext|>": EOT}
    merges = [(to_str(a), to_str(b)) for a, b in _merges_from_ranks(ranks)]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    runs = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
    hf.add_tokens([AddedToken(r, normalized=False, lstrip=False, rstrip=False,
                              single_word=False) for r in runs])
    return hf


def test_hf_reference_has_phi1_ids(hf):
    """The reference tokenizer itself has phi-1's vocabulary layout."""
    assert hf.get_vocab_size() == VOCAB_SIZE
    assert hf.token_to_id("<|endoftext|>") == EOT
    assert hf.token_to_id(" " * 31) == SPACES_31
    assert hf.token_to_id("  ") == SPACES_2
    assert hf.token_to_id("\t" * 9) == TABS_9
    assert hf.token_to_id("\t\t") == TABS_2
    assert hf.token_to_id(" ") is None and hf.token_to_id("\t") is None
    assert hf.encode("hello world").ids == bpe("hello world")  # the BPE itself agrees


TRICKY = [
    "", " ", "\t", "  ", "    return x", "def f(x):\n    return x  # done\n",
    "\n    \n", "\n\t\n", "\t\tif x:\n\t\t\treturn", "\t  \t\t x", " \t \t ",
    " " * 31, " " * 32, " " * 33, " " * 40, " " * 32 + "y", " " * 62 + "y", "\t" * 10,
    "\t" * 20 + "z", "x   ", "x  =  1", "a  b   c    d", "   leading", "trailing   \n",
    "x = 1  \n  \n", "\r\n    \r\n", "  \n  ", "don't  you'll   it's",
    "héllo wörld 日本語 🎉", "  π = 3.14  # ≈", "\u00a0 \u00a0  \u3000   x", "naïve\tcafé",
    "<|endoftext|>", "a<|endoftext|>b", "  <|endoftext|>  ", "<|endoftext|><|endoftext|>",
    "x\n<|endoftext|>\n    def", "<|endoftext", "<|endoftext|", "<|<|endoftext|>|>",
]


@pytest.mark.parametrize("text", TRICKY)
def test_matches_hf_on_tricky_strings(hf, text):
    """Our ids (with EOT allowed) equal Hugging Face's, and decode back the same."""
    ids = hf.encode(text).ids
    assert encode(text, allowed_special=True) == ids
    assert decode(ids) == hf.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=300, deadline=None)
@given(CODE_TEXT_EOT)
def test_matches_hf_on_code(hf, text):
    """Same ids as Hugging Face on random code-like text."""
    assert encode(text, allowed_special=True) == hf.encode(text).ids


@PROPERTY
@given(UNICODE_TEXT)
def test_matches_hf_on_unicode(hf, text):
    """Same ids as Hugging Face on random unicode (the pre-tokenizer regexes agree)."""
    assert encode(text, allowed_special=True) == hf.encode(text).ids


# --- 7. cutting at stop strings ----------------------------------------------------------

def test_cut_at_stop_keeps_the_text_before_the_earliest_stop():
    assert tok.cut_at_stop("\ndef g():", ["\ndef"]) == ""  # a stop at the very start leaves nothing
    assert tok.cut_at_stop("x\nclass A\ndef g", ["\ndef", "\nclass"]) == "x"
    assert tok.cut_at_stop("x = 1", ["\ndef"]) == "x = 1"
    assert tok.cut_at_stop("x = 1", ["", "\ndef"]) == "x = 1"  # empty stops stop nothing


def test_one_stop_string_may_be_given_as_a_str():
    r"""cut_at_stop(text, "\ndef") cuts at "\ndef", not at the first "\n", "d", "e" or "f"."""
    assert tok.cut_at_stop("def f():\n    x\ndef g", "\ndef") == "def f():\n    x"
    assert tok.cut_at_stop("x\nclass A\ndef g", ("\ndef", "\nclass")) == "x"
    assert tok.cut_at_stop("x = 1", "") == "x = 1"
    for stops in (b"\n", ["\ndef", 5]):  # bytes iterate as ints: no stop may be one
        with pytest.raises(ValueError, match="stop strings must be str"):
            tok.cut_at_stop("x = 1", stops)


# --- 8. loading the BPE ------------------------------------------------------------------

def test_bpe_cache_dir_is_the_users_else_the_offline_copy(monkeypatch, tmp_path):
    """$TIKTOKEN_CACHE_DIR wins; unset, the offline copy is used only if it exists."""
    seen = []
    monkeypatch.setattr(tiktoken, "get_encoding",
                        lambda name: seen.append((name, os.environ.get("TIKTOKEN_CACHE_DIR"))) or "bpe")
    offline = tmp_path / "offline"
    offline.mkdir()
    monkeypatch.setattr(tok, "_OFFLINE_CACHE", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "mine"))
    assert tok._bpe.__wrapped__() == "bpe"  # the function under functools.cache
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    tok._bpe.__wrapped__()
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    offline.rmdir()
    tok._bpe.__wrapped__()
    assert seen == [("r50k_base", str(tmp_path / "mine")), ("r50k_base", str(offline)), ("r50k_base", None)]


def test_bpe_that_cannot_load_is_a_user_error(monkeypatch):
    """Offline with no cached copy, the user gets one line on what to set, not a traceback."""
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match=r"cannot load tiktoken's r50k_base .*\(ConnectionError\).*TIKTOKEN_CACHE_DIR"):
        tok._bpe.__wrapped__()
