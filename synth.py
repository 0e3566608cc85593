"""Synthetic textbooks and exercises from a teacher LLM, as phi-1 made them (paper section 2.2).

    python synth.py textbook --n=10000 --model=gpt-3.5-turbo --concurrency=32 --rpm=3000
    python synth.py exercises --n=10000 --api-base=http://127.0.0.1:8000/v1 --model=my-model

Any OpenAI-compatible endpoint (llm.py): --api-base, else $OPENAI_BASE_URL, else
OpenAI; the key comes from $OPENAI_API_KEY.

textbook   sections of a textbook. Diversity comes from constraints drawn at random for
           each prompt from the lists below: a topic and subtopic (Python, computer
           science, mathematics), a target audience, a style, and three words the text
           must use. Records: {"id", "text", "constraints", "model"}.
exercises  function-completion exercises. Each prompt asks for one function with a given
           name (verb, adjective, noun, qualifier, some left out: ~4M names) on a given
           topic, with a signature, a docstring with examples, and the solution. The answer
           must parse (ast) and hold just that function (imports above it allowed), with a
           docstring and a real body. Records: {"id", "prompt" (imports, signature,
           docstring), "completion" (the body), "text" (prompt + completion), "examples",
           "constraints", "model"}: finetune.py reads prompt and completion. "examples" is
           the verdict of the docstring's `>>>` examples run as asserts in evaluate.py's
           sandbox (passed, failed: ..., timed out, crashed: ...), "none" without examples,
           "unchecked" without a sandbox (--check_examples=false, or evaluate.py lacks one).

Determinism and resume. Item i of --seed s has the id "<kind>-<s>-<i>"; its constraints
come from a generator seeded by (kind, s, i), and its requests carry a seed made of
(id, number of answers so far), so the output depends on nothing but (seed, index) and
what the endpoint answers. Items run --concurrency at a time but are written in index
order (one that finishes early waits for those before it), one flushed line each; an
item judged to yield no record gets a line in FILE.skipped ({"id", "reason"}). So a run
killed at any moment, started again with the same command, skips every id in either
file and ends with the same records as a run never stopped (given an endpoint that
answers the same request the same way), none twice. A line torn by the kill is cut off.
Before its first request, a rerun reads the records written, to drop duplicates of them:
their MinHashes are made by a process a core, under a progress bar (at a million records,
one core took 25 minutes). One run at a time writes an output (a lock on it); a second
one stops at once. An output holds one kind: a run on another kind's output stops before
any request; one that adds to another --model's records says so (each record names its
model).

An item yields no record when --attempts answers were judged unusable (an invalid
exercise, an empty answer, an answer cut off: finish_reason "length" or "content_filter"),
when the endpoint refused its request (a 4xx, or an answer without text: not sent again,
a content filter, say), or when it duplicates a record already written: the same text up
to case and whitespace, or a near-duplicate whose word 5-grams have an estimated Jaccard
similarity of at least --near_dup (MinHash with numpy). Its slot goes to the next index,
until the file holds --n records of this kind and seed. An item whose answers were cut off
at --max_tokens is skipped as "cut off at --max_tokens=N": a run with a larger --max_tokens
asks for it again (first, if it needs more records), and the summary says how many were.
An answer cut off after fewer tokens than --max_tokens (its reply's usage says how many)
ran out of the model's context (sample.py --serve clamps max_tokens to the room the prompt
leaves, llama.cpp with --parallel shares its context among slots): its item is skipped as
"cut off by the model's context after N tokens", which more --max_tokens would not change.
With --keep_cut_off, answers cut off either way are taken as they are.

Two kinds of failure are not verdicts on an item, and leave no line anywhere, so the
same command run again asks for those items anew (their records then come after the
others): a request that failed for good after llm.py's retries (an outage, a timeout),
which ends its item at once, whatever its answers before (its next attempt would retry as
long again: a hung endpoint takes 14 minutes at the defaults), and keeps its item's slot,
the run ending short of --n and saying so; and llm.FAILED_ALIKE (5) items in a row whose
requests failed the same way, which says the request or the endpoint is at fault, not the
items, and ends the run quoting the failure: refused alike (the same status and message
but for its numbers) is likely a setting the endpoint rejects; failed alike otherwise, an
endpoint down or not OpenAI-compatible (a proxy's page in place of answers). An item
refused after an answer is judged by its answers. (Older versions wrote failed requests
to FILE.skipped as "request failed: ..."; those lines are not taken as done.)

Errors end the run with one line and exit status 2, the output as it was: a bad setting
or subcommand, an output that cannot be written, another run writing it, and an endpoint
that is unreachable, redirects (the line says where to), refuses the key or lacks the
model (checked with one GET /models before anything else). A 401, 403 or 404 later in the
run ends it the same way, and so do a write that fails (a full disk), --give_up items in a
row without a record (the endpoint or model is not up to the task), failures alike (above),
items whose requests failed (a rerun retries them) and a bug (after its traceback); the
items before them are written.
Settings an OpenAI-compatible API rejects (--temperature outside [0, 2], --max_tokens
below 1) are refused before any request. Ctrl-C (or SIGTERM, or SIGHUP: a closed terminal
or ssh session, unless under nohup) starts no new items or requests, cuts short the waits
before retries, lets the requests in flight end, writes the items finished before the
first one left unfinished (a rerun asks for that one and those after it again), and exits
with status 130; a second Ctrl-C exits at once.

The progress bar shows records/s, tokens, cost (with --price_in/--price_out; unknown
where the endpoint reports no token usage) and failures. At the end a summary and a
diversity report (distinct n-gram ratios, the duplicate rate: exact and near duplicates
dropped, of them and the records, coverage of the constraint lists) are printed and
written to FILE.report.json, with this run's numbers ("run") and those of every run
that reported on the file, added up ("all_runs": a rerun loses no cost; a run killed
with SIGKILL, or by a power loss, reports nothing, and its cost is not in them). A run
without prices records its cost as unknown (null), and so is then the cost of all runs.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import llm
from config import Unfailing, UserError, parse_args, require, run, stop_signals, subcommand
from data.prepare import Appender, cannot_write, check_writable, read_jsonl, run_lock, worker_signals, write_atomic

DEFAULTS = dict(
    n=100,  # records of this kind and seed the output file should hold at the end
    out="",  # output JSONL (default out/<kind>.jsonl); FILE.skipped and FILE.report.json beside it
    model="gpt-3.5-turbo",  # the teacher model (the paper's generator)
    seed=1337,  # item i of seed s is the same whenever it is made
    **llm.DEFAULTS,  # the client: --api_base, --concurrency, --rpm, --tpm, --timeout, ... (llm.py)
    temperature=1.0,  # sampling temperature of the teacher
    max_tokens=1024,  # tokens per answer at most
    keep_cut_off=False,  # take answers cut off (--max_tokens, context) as they are (the toy's teacher never stops)
    attempts=3,  # answers per item before giving up on it (a request that fails for good ends it at once)
    near_dup=0.8,  # estimated Jaccard similarity of word 5-grams that makes a near-duplicate
    give_up=100,  # items in a row without a record that end the run
    check_examples=True,  # exercises: run the docstring's examples in evaluate.py's sandbox
)

KINDS = ("textbook", "exercises")
KNOWN_CHUNK = 4096  # records of the output read, then signed on all cores, at a time when a run resumes
CUT = "cut off at --max_tokens={}"  # an item's reason, once an answer was: a run with more asks again
CONTEXT_CUT = "cut off by the model's context after {} tokens"  # a verdict: more --max_tokens would not help
CONTEXT_HINT = "--keep_cut_off keeps them; else more context per request (llama.cpp: fewer --parallel) or another model"

# ---------------------------------------------------------------- what to write about

TOPICS = """
# Python
variables and types: naming variables, integers and floats, booleans, type conversion, None
strings: indexing and slicing, string methods, f-strings, escape sequences, Unicode and encodings
lists: indexing lists, appending and removing items, slicing lists, nested lists, list methods
tuples: packing and unpacking, immutability, named tuples, tuples as dictionary keys, returning several values
dictionaries: lookup and insertion, iterating over items, default values, counting with dictionaries, nested dictionaries
sets: membership tests, set operations, removing duplicates, frozensets, set comprehensions
conditionals: if and else, elif chains, boolean logic, truthiness, conditional expressions
loops: for loops, while loops, break and continue, the else clause of loops, nested loops
functions: parameters and arguments, return values, default arguments, keyword arguments, variable arguments
scope: local and global names, closures, nonlocal, name shadowing, the LEGB rule
recursion: base cases, recursive definitions, recursion depth, memoization, recursion versus iteration
comprehensions: list comprehensions, dictionary comprehensions, filtering in comprehensions, nested comprehensions, generator expressions
iterators and generators: the iterator protocol, yield, lazy evaluation, itertools, infinite sequences
higher-order functions: map and filter, lambda expressions, sorting with a key, functools.reduce, functions as values
decorators: wrapping functions, functools.wraps, decorators with arguments, timing decorators, caching decorators
classes: defining classes, attributes, methods, initializers, class and instance attributes
inheritance: subclasses, super, overriding methods, multiple inheritance, abstract base classes
special methods: __repr__ and __str__, comparison methods, __len__ and __getitem__, operator overloading, __eq__ and __hash__
dataclasses: fields, default values, frozen dataclasses, ordering, post-init processing
exceptions: try and except, raising exceptions, custom exceptions, finally, exception chaining
context managers: with statements, __enter__ and __exit__, contextlib, managing files, cleanup
files: reading text files, writing files, paths with pathlib, CSV files, JSON files
modules and packages: import statements, writing modules, the standard library, running a module as a script, packages
testing: assert statements, unittest, pytest, edge cases, doctests
debugging: reading tracebacks, print debugging, pdb, logging, common bugs
type hints: annotations, Optional, generics, protocols, static checking
text processing: splitting and joining, regular expressions, parsing text, formatting tables, counting words
the collections module: Counter, defaultdict, deque, namedtuple, OrderedDict
sorting in Python: sorted and sort, key functions, stable sorting, sorting by several keys, reverse order
numbers in Python: integer division and modulo, floating point precision, the math module, decimal, fractions
dates and times: datetime, timedelta, formatting dates, time zones, measuring time
randomness: the random module, seeding, shuffling, sampling, simulations
concurrency in Python: threads, processes, asyncio, race conditions, queues
performance: timing code, algorithmic cost, profiling, choosing data structures, caching results
style: PEP 8, naming, docstrings, readable code, refactoring
command-line programs: sys.argv, argparse, exit codes, standard input, printing output
NumPy: arrays, vectorized operations, broadcasting, indexing arrays, aggregations
object-oriented design: encapsulation, composition, interfaces, properties, design patterns
functional programming: pure functions, immutability, partial application, function composition, folds
iteration tools: enumerate, zip, range, reversed, any and all
objects and memory: references, mutability, copying, identity and equality, garbage collection
# computer science
algorithms: what an algorithm is, pseudocode, correctness, counting steps, invariants
complexity: big O notation, best and worst cases, amortized cost, space complexity, comparing growth rates
searching: linear search, binary search, searching sorted data, bisection, search in rotated arrays
sorting algorithms: bubble sort, insertion sort, merge sort, quicksort, counting sort
arrays: contiguous memory, dynamic arrays, two pointers, sliding windows, prefix sums
linked lists: singly linked lists, doubly linked lists, reversing a list, cycle detection, merging lists
stacks and queues: stack operations, queue operations, balanced brackets, deques, priority queues
hash tables: hash functions, collisions, load factor, open addressing, applications of hashing
trees: binary trees, tree traversals, tree height, binary search trees, balanced trees
heaps: binary heaps, heapify, heap sort, top-k problems, the heapq module
graphs: adjacency lists, breadth-first search, depth-first search, connected components, topological sort
shortest paths: Dijkstra's algorithm, Bellman-Ford, weighted graphs, paths in grids, negative cycles
dynamic programming: overlapping subproblems, memoization tables, tabulation, knapsack problems, longest common subsequence
greedy algorithms: interval scheduling, making change, Huffman coding, exchange arguments, when greed fails
divide and conquer: splitting problems, recurrences, fast exponentiation, closest pair of points, Karatsuba multiplication
backtracking: permutations, subsets, the N-queens puzzle, sudoku, pruning
string algorithms: palindromes, anagrams, pattern matching, edit distance, tries
bit manipulation: binary representation, bitwise operators, bit masks, counting bits, powers of two
number representation: binary and hexadecimal, two's complement, floating point formats, character encodings, overflow
state machines: finite automata, states and transitions, parsing with state machines, regular languages, vending machines
databases: tables and rows, SQL queries, indexes, transactions, normalization
networking: clients and servers, HTTP requests, sockets, JSON APIs, latency and bandwidth
operating systems: processes, threads, virtual memory, file systems, scheduling
interpreters and compilers: tokenizing, parsing, abstract syntax trees, evaluating expressions, bytecode
software engineering: version control, code review, testing strategies, documentation, modular design
security: validating input, hashing passwords, encryption, injection attacks, least privilege
computer architecture: processors and memory, caches, instructions, clock speed, parallelism
caching: hits and misses, LRU caches, memoization, cache invalidation, time to live
randomized algorithms: random sampling, reservoir sampling, Monte Carlo methods, randomized quicksort, hashing with randomness
simulation: discrete event simulation, cellular automata, random walks, the game of life, simulating queues
data compression: run-length encoding, Huffman codes, dictionary coding, lossless and lossy compression, entropy
machine learning: training data, features and labels, linear regression, overfitting, evaluating models
concurrency: locks, deadlock, producers and consumers, atomic operations, message passing
intervals: merging intervals, overlapping ranges, sweep lines, meeting rooms, calendar booking
grids and matrices: matrix traversal, rotating a matrix, spiral order, sparse matrices, grids as graphs
# mathematics
arithmetic: order of operations, fractions, percentages, ratios, rounding
number theory: divisibility, prime numbers, greatest common divisors, modular arithmetic, the sieve of Eratosthenes
algebra: linear equations, quadratic equations, systems of equations, inequalities, factoring
functions in mathematics: domain and range, composition, inverse functions, piecewise functions, growth of functions
sequences and series: arithmetic sequences, geometric sequences, Fibonacci numbers, partial sums, convergence
combinatorics: counting principles, permutations, combinations, Pascal's triangle, binomial coefficients
probability: events, conditional probability, expected value, independence, Bayes' rule
statistics: mean and median, variance, standard deviation, histograms, correlation
geometry: distances between points, areas and perimeters, triangles, circles, coordinate geometry
trigonometry: sine and cosine, angles and radians, the unit circle, solving triangles, periodic functions
vectors: vector addition, dot products, norms, angles between vectors, projections
matrices: matrix multiplication, identity and inverse, determinants, solving linear systems, linear transformations
calculus: limits, derivatives, integrals, numerical differentiation, numerical integration
logic: propositions, truth tables, logical equivalence, quantifiers, proof by contradiction
sets and relations: set notation, unions and intersections, relations, equivalence relations, functions as relations
graph theory: vertices and edges, degrees, paths and cycles, trees in graph theory, graph coloring
proofs: direct proofs, induction, contradiction, counterexamples, invariants in proofs
numerical methods: root finding, the bisection method, Newton's method, rounding error, fixed-point iteration
exponents and logarithms: powers, exponential growth, logarithms, change of base, compound growth
discrete mathematics: recurrence relations, the pigeonhole principle, inclusion and exclusion, counting paths, modular patterns
number bases: binary numbers, octal numbers, hexadecimal numbers, base conversion, digit sums
polynomials: evaluating polynomials, Horner's method, roots of polynomials, polynomial arithmetic, interpolation
applied linear algebra: least squares, Markov chains, image transformations, networks of equations, rankings
optimization: minima and maxima, gradient descent, linear programming, constraints, search for optima
puzzles and games: nim, tic-tac-toe, invariants in puzzles, magic squares, the towers of Hanoi
financial mathematics: simple interest, compound interest, loans and payments, present value, budgets
measurement: unit conversion, significant figures, scientific notation, estimation, dimensional analysis
fractals: the Sierpinski triangle, the Koch snowflake, self-similarity, recursive sequences, the Mandelbrot set
cryptography: the Caesar cipher, modular inverses, RSA, hash functions, checksums
sampling: random numbers, sampling without replacement, the law of large numbers, simulating dice, shuffling
"""


def _subtopics(text: str) -> list[tuple[str, str, str]]:
    """(area, topic, subtopic) for each subtopic of each topic line, under its "# area" heading."""
    found, area = [], ""
    for line in text.strip().splitlines():
        if line.startswith("# "):
            area = line[2:]
        else:
            topic, subtopics = line.split(": ")
            found += [(area, topic, s) for s in subtopics.split(", ")]
    return found


SUBTOPICS = _subtopics(TOPICS)
AUDIENCES = [
    "a high school student new to programming", "a first-year computer science student",
    "a self-taught programmer", "a data analyst who knows spreadsheets", "a mathematics student learning to code",
    "a curious twelve-year-old who likes puzzles", "a retired engineer", "a student preparing for coding interviews",
    "a teacher preparing a lesson", "a web developer who knows JavaScript", "a physics student",
    "a hobbyist who makes games", "a bootcamp student", "an experienced C programmer new to Python",
    "a biology researcher", "an economics student", "a competitive programmer",
    "a student who finds mathematics hard", "a professional changing careers", "a graduate student in statistics",
]
STYLES = [
    "a step-by-step tutorial", "a Socratic dialogue between a teacher and a student",
    "a textbook section with a worked example", "a series of short lessons, each ending with an exercise",
    "a story whose characters discover the ideas", "a concise reference with examples", "a lecture transcript",
    "a list of questions and answers", "a comparison of two approaches", "a walk through finding and fixing a bug",
    "a problem solved in stages", "an explanation from first principles", "a summary followed by worked examples",
    "a code review of a small program", "a short history of the idea followed by code",
]
WORDS = """
apple river ladder mirror garden ticket puzzle orbit candle bridge library recipe train island compass
harvest signal castle forest market lantern anchor balloon basket beacon blanket bottle bucket cabin canvas
carpet cattle chimney circus cliff cloud comet copper cottage crystal desert diamond dragon drum eagle engine
feather fence festival flute fountain galaxy glacier harbor helmet honey horizon jacket jungle kettle kite
lemon lighthouse magnet maple marble meadow meteor mountain needle ocean orchard oven paddle parrot pebble
pepper piano pillow planet pocket pond puppet quilt rabbit rainbow ribbon rocket saddle sailor sandwich
satellite scarf shadow shell shovel skyline snail spider stadium statue storm sunflower tablet telescope
thunder tiger tomato tower tractor treasure tunnel turtle umbrella valley violin volcano wagon wallet
waterfall whale whistle window wizard workshop zebra bakery bicycle carnival chess domino elevator farmer
glove hammock igloo jigsaw kayak llama mosaic notebook octopus pirate quartz robot scooter tent unicorn
vase walrus yacht zipper inventory voyage tournament museum journal postcard orchestra ferry
""".split()

# exercise function names: verb, an adjective (3 in 5), noun, a qualifier (1 in 3): ~4M names
VERBS = """
count find merge reverse sort filter group split flatten parse format validate normalize convert compute sum
average rotate shift encode decode compress expand remove insert replace extract match search rank score
scale round clip pair chunk collect build generate simulate estimate measure detect compare combine partition
interleave swap transpose fill pad trim summarize index tally select sample shuffle cache track schedule
balance route classify label
""".split()
ADJECTIVES = """
longest shortest largest smallest unique duplicate even odd sorted nested consecutive missing common distinct
positive negative prime palindromic adjacent alternating weighted valid empty first last balanced overlapping
frequent rare matching
""".split()
NOUNS = """
words vowels digits primes intervals matrix grid pairs strings numbers letters lines tokens sentences dates
scores grades prices temperatures coordinates points rectangles circles triangles vectors polynomials
fractions coins items orders invoices emails usernames passwords urls paths files records rows columns cells
nodes edges trees graphs cycles islands rooms tasks events meetings appointments flights
trains stations routes cities countries students employees books movies songs playlists recipes ingredients
inventory transactions accounts balances bits bytes colors pixels images notes chords moves cards dice
players teams matches rounds votes ballots polls keys values entries tags categories messages logs errors
timestamps durations segments ranges substrings prefixes suffixes anagrams brackets expressions
""".split()
QUALIFIERS = """
by_length by_key by_frequency in_place in_range in_order from_text from_string to_dict to_list per_day
per_group with_limit with_weights without_duplicates under_budget within_distance at_depth across_rows
for_each_key
""".split()


def item_id(kind: str, seed: int, index: int) -> str:
    return f"{kind}-{seed}-{index}"


def draw(kind: str, seed: int, index: int) -> dict:
    """The constraints of item index: a function of (kind, seed, index) alone."""
    rng = random.Random(item_id(kind, seed, index))  # str seeds are hashed with SHA-512: stable
    area, topic, subtopic = rng.choice(SUBTOPICS)
    if kind == "textbook":
        return dict(area=area, topic=topic, subtopic=subtopic, audience=rng.choice(AUDIENCES),
                    style=rng.choice(STYLES), words=rng.sample(WORDS, 3))
    verb, noun = rng.choice(VERBS), rng.choice(NOUNS)
    adjective = rng.choice(ADJECTIVES) if rng.random() < 0.6 else ""
    qualifier = rng.choice(QUALIFIERS) if rng.random() < 1 / 3 else ""
    name = "_".join(w for w in (verb, adjective, noun, qualifier) if w)
    return dict(name=name, verb=verb, adjective=adjective, noun=noun, qualifier=qualifier, area=area, topic=topic,
                subtopic=subtopic)


def messages(kind: str, c: dict) -> list[dict]:
    """The chat request for an item with constraints c."""
    if kind == "textbook":
        system = "You are an expert teacher writing a textbook that teaches coding and reasoning."
        words = ", ".join(c["words"][:-1]) + " and " + c["words"][-1]
        user = (f"Write a section of a textbook for {c['audience']}, in the form of {c['style']}.\n"
                f"Topic: {c['subtopic']} (part of {c['topic']}, in {c['area']}).\n"
                f"Make it clear, correct and self-contained, and teach through short Python code examples "
                f"and what they show. Use the words {words} somewhere in the text.\n"
                f"Write only the section itself, in Markdown.")
    else:
        system = "You are an expert Python teacher writing programming exercises."
        user = (f"Write a Python exercise: one function named `{c['name']}` that has to do with {c['subtopic']} "
                f"({c['topic']}, in {c['area']}).\n"
                f"Give it a signature with type hints and a docstring that states the task precisely and shows one "
                f"to three examples, each a `>>> {c['name']}(...)` line followed by the expected result. Then "
                f"write a correct, clear solution as its body.\n"
                f"Use only the standard library and put any imports above the function. Reply with the code "
                f"alone, in one ```python block: no other functions, no tests, no prose.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def request_seed(rid: str, answers: int) -> int:
    """The sampling seed of an item's next request: a new one after each answer, so an invalid
    answer is not asked for again, and the same in every run."""
    return int.from_bytes(hashlib.sha256(f"{rid}/{answers}".encode()).digest()[:4], "big") >> 1


# ---------------------------------------------------------------- answers to records

class Invalid(Exception):
    """An answer that cannot become a record; the message says why."""


FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)  # ```Python too
PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)  # ast.parse's, for bad or too deep code


def parse_exercise(text: str, name: str) -> tuple[str, str]:
    """(prompt, completion) of an answer holding one function `name` with a docstring and a body:
    prompt = imports, signature, docstring; completion = the body after the docstring. The code
    is the fenced block that defines `name` (a usage example may come before it), else the
    first block, else the whole answer. Lines end in "\n" alone: Python also ends them at
    "\r\n" and "\r", and at nothing else."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = [m.group(1) for m in FENCE.finditer(text)]
    defines = re.compile(rf"^[ \t]*def[ \t]+{re.escape(name)}[ \t]*\(", re.M)
    code = next((b for b in blocks if defines.search(b)), blocks[0] if blocks else text)
    code = textwrap.dedent(code).strip("\n") + "\n"
    tree = _parsed(code, "does not parse")
    *imports, func = tree.body or [None]
    if not isinstance(func, ast.FunctionDef) or not all(isinstance(s, (ast.Import, ast.ImportFrom))
                                                        for s in imports):
        raise Invalid("not one function alone (imports above it aside)")
    if func.name != name:
        raise Invalid(f"the function is named {func.name}, not {name}")
    if ast.get_docstring(func) is None:
        raise Invalid("no docstring")
    body = func.body[1:]
    if not body or all(_placeholder(s) for s in body):
        raise Invalid("no body")
    split = func.body[0].end_lineno  # the docstring's last line
    if body[0].lineno <= split:
        raise Invalid("the body starts on the docstring's line")
    lines = [line + "\n" for line in code.split("\n")]  # not splitlines(): "\x0c", "\u2028", ... end no line
    prompt, completion = "".join(lines[:split]), "".join(lines[split:func.end_lineno])
    # its last line may go on past the function's end ("\" onto a comment): cut off, it parses no more
    _parsed(prompt + completion, "does not parse without what follows it")
    return prompt, completion


def _parsed(code: str, invalid: str) -> ast.Module:
    """The tree of code; Invalid, saying `invalid` and why, where it does not parse."""
    try:
        return ast.parse(code)
    except SyntaxError as e:  # newer Pythons raise it for a null byte too, with no line
        raise Invalid(f"{invalid} ({e.msg}{f', line {e.lineno}' if e.lineno else ''})") from None
    except PARSE_ERRORS as e:  # nesting too deep for the parser, or a null byte (older Pythons)
        raise Invalid(f"{invalid} ({type(e).__name__})") from None


def _placeholder(statement: ast.stmt) -> bool:
    """pass, a bare constant (..., a second docstring) or raise NotImplementedError: a
    statement that does nothing."""
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return True
    if not isinstance(statement, ast.Raise):
        return False
    error = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
    return isinstance(error, ast.Name) and error.id == "NotImplementedError"


def example_asserts(code: str) -> str:
    """The `>>>` examples of the last function's docstring in code, as Python: `>>> f(1)` then `2`
    becomes `assert (f(1)) == (2)`; an example without a result runs as it is; one that prints,
    or whose result is no expression (a traceback, printed text), is left out; code that does
    not parse has none that can run."""
    try:
        docstring = ast.get_docstring(ast.parse(code).body[-1]) or ""
        examples = doctest.DocTestParser().get_examples(docstring)
    except PARSE_ERRORS:  # ValueError: badly indented examples too
        examples = []
    lines = []
    for example in examples:
        source, want = example.source.strip(), example.want.strip()
        if not want:
            lines.append(source)
            continue
        try:  # unparsed: without the comments (`>>> f(2)  # twice`) that would swallow the closing ")"
            got, expected = (ast.unparse(ast.parse(text, mode="eval")) for text in (source, want))
        except PARSE_ERRORS:
            continue
        if source.startswith("print("):
            continue
        lines.append(f"assert ({got}) == ({expected}), {source!r}")
    return "\n".join(lines)


def open_sandbox(workers: int):
    """evaluate.py's sandbox for the exercises' examples, or None (they go "unchecked") without one."""
    try:
        from evaluate import Sandbox
        return Sandbox(workers)
    except (ImportError, UserError) as e:
        print(f"note: the exercises' examples go unchecked: {e}", file=sys.stderr)
        return None


def check_examples(exercise: dict, sandbox) -> str:
    """The sandbox's verdict on the exercise's examples: passed, failed: ..., timed out or
    crashed: ...; "none" if its docstring has none, "unchecked" without a sandbox."""
    asserts = example_asserts(exercise["text"])
    if not asserts:
        return "none"
    if sandbox is None:
        return "unchecked"
    try:
        return sandbox.run([("exercise", exercise["text"]), ("examples", asserts + "\n")])
    except OSError as e:  # its files (a full disk, where the temporary folder is)
        raise cannot_write(Path(e.filename or tempfile.gettempdir()), e) from None


def to_record(kind: str, text: str, c: dict, sandbox) -> dict:
    """The record's content from an answer (raising Invalid)."""
    if kind == "textbook":
        if not text.strip():
            raise Invalid("empty answer")
        return {"text": text.replace("\r\n", "\n").strip()}  # a server's CRLF: no "\r" in what trains
    prompt, completion = parse_exercise(text, c["name"])
    record = {"prompt": prompt, "completion": completion, "text": prompt + completion}
    return {**record, "examples": check_examples(record, sandbox)}


# ---------------------------------------------------------------- duplicates

class Dedup:
    """Exact duplicates (the same text up to case and whitespace) and near-duplicates (word 5-gram
    sets with an estimated Jaccard similarity >= threshold) of everything added so far.

    MinHash: 128 hash functions (a * x + b) mod (2^61 - 1) of 32-bit shingle hashes, the minimum
    of each over a text's shingles; the fraction of equal minima estimates the Jaccard
    similarity. LSH: texts that agree on all 4 values of one of 32 bands are candidates (found
    with probability 0.9998 at similarity 0.7, 0.23 at 0.3); only those are compared.

    The index holds a band as one 60-bit number (a Python int of 32 bytes) and a row alone
    until a second one shares its band: it was bytes keys and lists of one row, 1.4 GB per
    200K records. Two bands that differ but map to one number only add a candidate, which
    the comparison of whole signatures rules out."""

    PERMS, BANDS, SHINGLE = 128, 32, 5
    PRIME, MASK = np.uint64((1 << 61) - 1), np.uint64((1 << 32) - 1)
    _rng = np.random.default_rng(0)  # fixed: signatures stay comparable between runs (and processes)
    A = _rng.integers(1, 1 << 31, PERMS, dtype=np.uint64)
    B = _rng.integers(0, 1 << 31, PERMS, dtype=np.uint64)
    del _rng
    MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
                   np.uint64)  # odd 64-bit multipliers that fold a band's 4 values into one number

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.exact: dict[bytes, str] = {}  # normalized text digest -> id
        self.buckets = [{} for _ in range(self.BANDS)]  # per band: its number -> a row, or a list of rows
        self.signatures = np.zeros((1024, self.PERMS), np.uint32)
        self.ids: list[str] = []

    @classmethod
    def signature(cls, text: str) -> np.ndarray:
        """The MinHash of text's word 5-grams (all its words if fewer); thread-safe, and it
        needs no instance, so that worker processes can compute it (known())."""
        words = re.findall(r"\w+", text.lower())
        if not words:
            return np.full(cls.PERMS, cls.MASK, np.uint32)
        h = np.array([zlib.crc32(w.encode()) for w in words], np.uint64)
        k = min(cls.SHINGLE, len(h))
        shingles = np.zeros(len(h) - k + 1, np.uint64)
        for j in range(k):  # a polynomial hash of k words, mod 2^32
            shingles = (shingles * np.uint64(1_000_003) + h[j:len(h) - k + 1 + j]) & cls.MASK
        low = np.full(cls.PERMS, cls.MASK, np.uint64)
        for start in range(0, len(shingles), 4096):  # 4096 x 128 at a time: a huge answer takes no GBs
            block = shingles[start:start + 4096, None]
            low = np.minimum(low, ((block * cls.A + cls.B) % cls.PRIME & cls.MASK).min(axis=0))
        return low.astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> list[int]:
        """Each band's 4 values as one number, wrapping mod 2^64; under 2^60, where Python's
        ints take 32 bytes, not 36."""
        mixed = (sig.reshape(self.BANDS, -1).astype(np.uint64) * self.MIX).sum(axis=1)
        return (mixed >> np.uint64(4)).tolist()

    def add(self, rid: str, text: str, signature: np.ndarray | None = None) -> str | None:
        """None if text is new (it is now known), else why it is a duplicate."""
        # surrogatepass: an answer may hold a lone surrogate (JSON can spell one), which json_line writes
        digest = hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8", "surrogatepass"),
                                 digest_size=16).digest()
        if digest in self.exact:
            return f"duplicate of {self.exact[digest]}"
        sig = self.signature(text) if signature is None else signature
        keys = self.band_keys(sig)
        rows = set()
        for bucket, key in zip(self.buckets, keys):
            held = bucket.get(key)
            if isinstance(held, list):
                rows.update(held)
            elif held is not None:
                rows.add(held)
        if rows:
            rows = sorted(rows)
            similarity = (self.signatures[rows] == sig).mean(axis=1)
            best = int(similarity.argmax())
            if similarity[best] >= self.threshold:
                return f"near duplicate of {self.ids[rows[best]]} (similarity {similarity[best]:.2f})"
        row = len(self.ids)
        if row == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.signatures[row] = sig
        self.ids.append(rid)
        self.exact[digest] = rid
        for bucket, key in zip(self.buckets, keys):
            held = bucket.setdefault(key, row)
            if isinstance(held, list):
                held.append(row)
            elif held != row:  # the band's second row
                bucket[key] = [held, row]
        return None


# ---------------------------------------------------------------- files

def sidecars(out: Path) -> tuple[Path, Path]:
    """The files beside the output: items without a record, and the report."""
    return out.with_name(out.name + ".skipped"), out.with_name(out.name + ".report.json")


def judged(skipped: dict, max_tokens: int = 0) -> bool:
    """Whether a line of FILE.skipped gives a verdict on its item that still holds: not a failed
    request, as older versions wrote there too (such an item was never judged, and is asked for
    again), nor answers cut off at fewer tokens than max_tokens (more room may make a record)."""
    reason = str(skipped.get("reason", ""))
    cut = re.search(CUT.format(r"(\d+)"), reason)
    return not reason.startswith("request failed") and not (cut and int(cut.group(1)) < max_tokens)


def progress(kind: str, cfg, out: Path, skipped: Path) -> tuple[int, set[str]]:
    """The records of this kind and seed that out holds, and the ids done: in out, or judged in
    FILE.skipped. Records count by id: two runs at once, before the lock, wrote each twice.
    An output with records of another kind is refused: its report would add up both kinds' runs;
    so is one with records synth.py did not write."""
    ids = {str(r.get("id", "")) for r in read_jsonl(out)}
    foreign = next((rid for rid in ids if rid.split("-")[0] not in KINDS), None)
    if foreign is not None:  # (a corpus, annotations, a file given by mistake) no run of ours should append to
        raise UserError(f"{out} holds records synth.py did not write (id {foreign!r}): give --out another file")
    other = next((rid for rid in ids if not rid.startswith(f"{kind}-")), None)
    if other:
        raise UserError(f"{out} holds {other.split('-')[0]} records ({other}), not {kind}: give --out another file")
    done = ids | {str(r.get("id", "")) for r in read_jsonl(skipped) if judged(r, cfg.max_tokens)}
    prefix = item_id(kind, cfg.seed, "")
    return sum(rid.startswith(prefix) for rid in ids), done


def known(out: Path, dedup: Dedup, model: str, stop: threading.Event) -> Counter:
    """Add the records of out to dedup, their signatures made by a process a core, with a
    progress bar: one core took 25 minutes at a million records, saying nothing, before the
    first request. Returns the records of another model, by model. A stop ends it early (the
    run then makes no items)."""
    with out.open("rb") as f:  # the bar's total: a count of lines is fast beside the parsing
        total = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    cores = len(os.sched_getaffinity(0))
    # processes, not threads: a third of signing (the regex, crc32 a word) holds the GIL, and two
    # threads on 2 cores made it 1.2-1.4x faster where two processes made it 1.6-1.75x. No pool for
    # a chunk: one core signs it sooner than processes start. Forked, as prepare.py's tokenizers,
    # and with worker_signals for the same reasons (Ctrl-C, a kill -9 of this process)
    pool = (ProcessPoolExecutor(cores, multiprocessing.get_context("fork"), initializer=worker_signals,
                                initargs=(os.getpid(),)) if cores > 1 and total > KNOWN_CHUNK else None)
    others, records = Counter(), read_jsonl(out)
    try:
        with tqdm(total=total, unit="rec", desc="known records", dynamic_ncols=True, disable=None) as bar:
            while not stop.is_set() and (chunk := list(itertools.islice(records, KNOWN_CHUNK))):
                texts = [str(record.get("text", "")) for record in chunk]
                share = -(-len(texts) // (4 * cores))  # 4 tasks a process: none waits long for the last
                signatures = pool.map(Dedup.signature, texts, chunksize=share) if pool else map(Dedup.signature, texts)
                for record, text, signature in zip(chunk, texts, signatures):
                    dedup.add(str(record.get("id", "")), text, signature)
                    if record.get("model") != model:
                        others[str(record.get("model"))] += 1
                bar.update(len(chunk))
    except BrokenProcessPool:
        raise UserError("a process signing the records of the output died (killed, or out of memory?): "
                        "run the command again") from None
    finally:
        if pool:  # the chunks not begun are dropped: a stop waits only for those running
            pool.shutdown(cancel_futures=True)
    return others


# ---------------------------------------------------------------- the run

@dataclass
class Outcome:
    """What became of one item: a record, or the reason there is none: unusable answers, or
    a failed request (then no verdict was reached, and a rerun asks again)."""
    index: int
    record: dict | None = None
    signature: np.ndarray | None = None  # the record's MinHash, computed in the worker
    reason: str = ""  # why the answers could not become a record
    invalid: int = 0  # answers that could not become a record
    cut: int = 0  # of them, answers cut off at --max_tokens
    context_cut: int = 0  # of them, answers cut off by the model's context, before --max_tokens
    failure: llm.Failure | None = None  # the request that failed for good and ended the item
    stopped: bool = False  # a stop came before it was done: neither a record nor a verdict


def make_item(kind: str, index: int, cfg, client: llm.Client, dedup: Dedup, sandbox,
              stop: threading.Event) -> Outcome:
    """Ask for item index until an answer makes a record, --attempts times at most, or until
    stop is set (a request in flight still ends), or a request fails for good: refused (a 4xx,
    or an answer without text: the same request would be refused the same way), or after
    llm.py's retries (then a verdict waits for a rerun, whatever the answers before it). An
    answer cut off (finish_reason "length" or "content_filter") is unusable; once one was
    cut at --max_tokens, the item's reason says so, since more tokens may make a record (not
    so where the model's context cut it shorter: context_cut). A fatal LLMError (wrong key,
    model or URL) propagates."""
    rid = item_id(kind, cfg.seed, index)
    constraints = draw(kind, cfg.seed, index)
    ask = messages(kind, constraints)
    out, answers = Outcome(index), 0
    for _ in range(cfg.attempts):
        if stop.is_set():
            out.stopped = True
            return out
        try:
            reply = client.chat(ask, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                seed=request_seed(rid, answers))
        except llm.LLMError as e:
            if e.failure.fatal:
                raise
            if e.failure.kind == "stopped":  # the stop came during a backoff
                out.stopped = True
            elif e.failure.kind != "refused" or not answers:  # a refusal after answers leaves their verdict
                # a refused request would be refused again; one that failed for good (an outage, a hung
                # endpoint) did so after all llm.py's retries, and the next attempt would retry as long
                # again (--max_retries + 1 times --timeout): the item ends here, with no verdict, and a
                # rerun asks for it anew
                out.failure = e.failure
            return out
        answers += 1
        short = context_cut(reply, cfg.max_tokens)
        try:
            if reply.finish_reason == "length" and not cfg.keep_cut_off:
                raise Invalid(CUT.format(cfg.max_tokens) if short is None else CONTEXT_CUT.format(short))
            if reply.finish_reason == "content_filter":
                raise Invalid("cut off by the content filter")
            record = to_record(kind, reply.text, constraints, sandbox)
        except Invalid as e:
            out.invalid += 1
            out.cut += reply.finish_reason == "length" and short is None
            out.context_cut += short is not None
            out.reason = f"invalid: {CUT.format(cfg.max_tokens) if out.cut else e}"
            continue
        out.record = {"id": rid, **record, "constraints": constraints, "model": cfg.model}
        out.signature = dedup.signature(record["text"])
        break
    return out


def context_cut(reply: llm.Reply, max_tokens: int) -> int | None:
    """The tokens of an answer cut off by the model's context, else None: finish_reason "length"
    after fewer tokens than max_tokens (the server cut max_tokens to the room its context left).
    Without usage, a cut is taken to be at max_tokens, as the server was asked."""
    if reply.finish_reason != "length" or reply.usage is None:
        return None
    tokens = reply.usage["completion_tokens"]
    return tokens if tokens < max_tokens else None


class Interrupts:
    """While active, the first Ctrl-C, SIGTERM or SIGHUP (a closed terminal or ssh session; not
    under nohup, which ignores it) sets .stop, the client's (no new items or requests, no waits
    before retries; those in flight end, and the sandbox is cleaned up); a second one exits at
    once (every written line is already flushed)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop  # the client's: its requests leave their backoffs at once
        self.signals = 0  # not stop.is_set(): an error that set it first wants its line said

    def __enter__(self):
        self.caught = stop_signals()
        self.previous = [signal.signal(s, self.handle) for s in self.caught]
        self.streams = sys.stdout, sys.stderr  # a signal makes them Unfailing: the report must be written
        return self

    def __exit__(self, *exc):
        for s, previous in zip(self.caught, self.previous):
            signal.signal(s, previous)
        sys.stdout, sys.stderr = self.streams

    def handle(self, signum, frame):
        self.signals += 1
        if self.signals == 1:
            sys.stdout, sys.stderr = Unfailing(sys.stdout), Unfailing(sys.stderr)
        if self.signals > 1:
            print("\ninterrupted", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.stop.set()
        print(f"\nstopping on {signal.Signals(signum).name}: waiting for the requests in flight "
              f"(Ctrl-C again to quit now)", file=sys.stderr, flush=True)


def synthesize(kind: str, cfg, client: llm.Client, dedup: Dedup, sandbox, out: Appender, skipped: Appender,
               have: int, done: set[str], stop: threading.Event) -> tuple[Counter, str | None]:
    """Make items until the output holds cfg.n records (have so far), but for the items whose
    requests failed (they keep their slots for a rerun), or stop is set. Returns the counts of
    this run (written, invalid answers, cut off at --max_tokens or by the context, items dropped
    by reason, unanswered) and the error that ended it, if one did: a fatal failure, a write
    that failed, --give_up items in a row without a record, FAILED_ALIKE items in a row whose
    requests failed the same way, unanswered items, or a bug (its traceback printed).

    A refused request (a 4xx, an answer without text) is a verdict on its item (a content
    filter, say) unless the next items are refused the same way, which points at the request
    itself (a setting): so the refusals of a run of them are written to FILE.skipped only once
    another outcome follows, or the run ends, with fewer than FAILED_ALIKE of them. Requests
    that failed alike for other reasons (an outage, a proxy's page in place of answers) end the
    run the same way, rather than each item retrying for minutes."""
    counts = Counter()
    indexes = (i for i in itertools.count() if item_id(kind, cfg.seed, i) not in done)
    queue: deque = deque()  # (index, future) of items not yet written, in index order
    streak, error = 0, None  # items in a row without a record; why the run must end
    alike: list[tuple[int, llm.Failure]] = []  # the last items without an answer, failed alike
    last_failure = None  # that of the last item without an answer

    def judge_refusals():  # each was about its own item: skipped for good, like an unusable answer
        for index, failure in alike:
            if failure.kind == "refused":
                skipped.write({"id": item_id(kind, cfg.seed, index), "reason": f"refused: {failure}"})
                counts["given up"] += 1
        alike.clear()

    bar = tqdm(total=cfg.n, initial=have, unit="rec", desc=kind, dynamic_ncols=True, disable=None)
    pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="item")
    try:
        while True:
            while not stop.is_set() and error is None and len(queue) < 4 * cfg.concurrency and \
                    have + counts["unanswered"] + len(queue) < cfg.n:
                index = next(indexes)
                try:
                    queue.append((index, pool.submit(make_item, kind, index, cfg, client, dedup, sandbox, stop)))
                except RuntimeError as e:  # no thread for it (the system's limit on threads): a setting, not a bug
                    error = f"cannot start the threads --concurrency={cfg.concurrency} asks for ({e}): lower it"
                    stop.set()
            if stop.is_set() or error is not None:
                while queue and queue[-1][1].cancel():  # not started yet: forget them
                    queue.pop()
            if not queue:
                break
            try:
                outcome = queue[0][1].result(timeout=0.25)
            except FutureTimeout:
                bar.set_postfix_str(postfix(client, counts), refresh=False)
                bar.update(0)
                continue
            except llm.LLMError as e:  # fatal: nothing after it may be written (gaps break resume)
                error = error or f"{client.api_base} refused a request ({e.failure.status}): {e.failure.message}"
                queue.popleft()
                stop.set()
                continue
            queue.popleft()
            if error is not None:
                continue
            if outcome.stopped:  # nothing after it may be written (gaps break resume)
                break
            counts["invalid answers"] += outcome.invalid
            counts["cut off"] += outcome.cut
            counts["context cut off"] += outcome.context_cut
            failure = outcome.failure
            if alike and not (failure is not None and failure.alike(alike[-1][1])):
                judge_refusals()  # another outcome came after them
            if failure is not None:  # no verdict on the item (yet): written nowhere for now
                reason, last_failure = f"request failed: {failure}", failure
                alike.append((outcome.index, failure))
                if failure.kind != "refused":  # it keeps its slot, and a rerun asks again
                    counts["unanswered"] += 1
            elif outcome.record is None:
                reason = outcome.reason
            else:
                reason = dedup.add(outcome.record["id"], outcome.record["text"], outcome.signature)
            if reason is None:
                out.write(outcome.record)
                have, streak = have + 1, 0
                counts["written"] += 1
                bar.update(1)
            else:
                if failure is None:
                    skipped.write({"id": item_id(kind, cfg.seed, outcome.index), "reason": reason})
                    counts[drop_kind(reason)] += 1
                streak += 1
                if len(alike) >= min(cfg.give_up, llm.FAILED_ALIKE):
                    error = failed_alike(client, len(alike), failure)
                elif streak >= cfg.give_up:
                    hint = (f"is {client.api_base} working?" if failure is not None else
                            "raise --max_tokens?" if outcome.cut else
                            f"the model's context cuts the answers short: {CONTEXT_HINT}" if outcome.context_cut else
                            f"is --model={cfg.model} up to the task?")
                    error = f"{streak} items in a row gave no record (the last: {reason[:200]}); {hint}"
                if error is not None:
                    stop.set()  # the items in flight would be thrown away: no more requests (and bills)
            bar.set_postfix_str(postfix(client, counts), refresh=False)
        if error is None and not stop.is_set():
            judge_refusals()  # fewer than FAILED_ALIKE at the end
    except UserError as e:  # a write failed: the lines before it are whole
        error = str(e)
        stop.set()  # as above
    except Exception as e:  # a bug (on one item's answer, say): shown, and the run ends as on an error, with its report
        traceback.print_exception(e)
        error = f"{type(e).__name__}: {str(e)[:200]} (a bug: the traceback above says where)"
        stop.set()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if error is None and not stop.is_set() and counts["unanswered"]:
        error = (f"{counts['unanswered']} items got no answer (the last: {last_failure}); run the same "
                 f"command again to ask for them again")
    return counts, error


def failed_alike(client: llm.Client, count: int, failure: llm.Failure) -> str:
    """Why the run ended when the requests of the last items failed the same way: refused (a
    400, say), so likely a setting or model the endpoint does not take; otherwise an endpoint
    that does not answer as one should. Not the items, which a rerun asks for again."""
    if failure.kind == "refused":
        return (f"{client.api_base} refused the last {count} requests alike ({failure.status}: "
                f"{failure.message[:200]}): does it take the settings sent (--model, --temperature, "
                f"--max_tokens)? A rerun asks for those items again")
    return (f"the requests of the last {count} items failed alike ({str(failure)[:200]}): is {client.api_base} "
            f"working, and an OpenAI-compatible endpoint? A rerun asks for those items again")


def drop_kind(reason: str) -> str:
    return reason.split(" of ")[0] if "duplicate of" in reason else "given up"


def cost(client: llm.Client, amount: float | None) -> str:
    """A cost to show, with --price_in/--price_out; None (the endpoint left out the usage of a
    reply) is unknown, not a made-up $0.00."""
    if not (client.price_in or client.price_out):
        return ""
    return ", cost unknown" if amount is None else f", ${amount:.2f}"


def postfix(client: llm.Client, counts: Counter) -> str:
    s = client.stats
    failures = sum(s.failures.values()) + counts["invalid answers"]
    dropped = counts["duplicate"] + counts["near duplicate"] + counts["given up"]
    spent = cost(client, None if s.no_usage else s.cost)
    return f"{(s.tokens_in + s.tokens_out) / 1000:.1f}k tok{spent}, {failures} failed, {s.retries} retries, " \
           f"{dropped} dropped"


# ---------------------------------------------------------------- the report

LISTS = {"subtopics": SUBTOPICS, "audiences": AUDIENCES, "styles": STYLES, "words": WORDS, "verbs": VERBS,
         "adjectives": ADJECTIVES, "nouns": NOUNS, "qualifiers": QUALIFIERS}
COVERED = {"textbook": ("subtopics", "audiences", "styles", "words"),
           "exercises": ("subtopics", "verbs", "adjectives", "nouns", "qualifiers")}
SAMPLE = 1000  # records the distinct n-gram ratios are measured on


def used(kind: str, c: dict) -> dict[str, list]:
    """The entries of each constraint list that constraints c drew."""
    values = {"subtopics": [(c["area"], c["topic"], c["subtopic"])]}
    if kind == "textbook":
        return {**values, "audiences": [c["audience"]], "styles": [c["style"]], "words": c["words"]}
    return {**values, "verbs": [c["verb"]], "nouns": [c["noun"]],
            **{key: [c[field]] if c[field] else [] for key, field in (("adjectives", "adjective"),
                                                                          ("qualifiers", "qualifier"))}}


def diversity(kind: str, out: Path, skipped: Path) -> dict:
    """Records, distinct n-gram ratios (on a sample), duplicates dropped and list coverage of the
    output's records of this kind, all seeds and runs together. An item dropped is counted
    once, by its last reason, and not at all once it made a record (a rerun with a larger
    --max_tokens asks again for those cut off)."""
    rng, sample, ids = random.Random(0), [], set()
    seen = {name: set() for name in COVERED[kind]}
    for record in read_jsonl(out):
        rid = str(record.get("id", ""))
        if not rid.startswith(f"{kind}-") or rid in ids:  # another kind's, or written twice (before the lock)
            continue
        ids.add(rid)
        if len(sample) < SAMPLE:  # a reservoir sample
            sample.append(record.get("text", ""))
        elif (j := rng.randrange(len(ids))) < SAMPLE:
            sample[j] = record.get("text", "")
        try:
            for name, values in used(kind, record["constraints"]).items():
                seen[name].update(tuple(v) if isinstance(v, list) else v for v in values)
        except (KeyError, TypeError):
            pass  # a record of some other origin
    tokens = [re.findall(r"\w+|[^\w\s]", text.lower()) for text in sample]
    distinct = {}
    for n in (1, 2, 3, 4):
        grams = [tuple(t[i:i + n]) for t in tokens for i in range(len(t) - n + 1)]
        distinct[str(n)] = round(len(set(grams)) / len(grams), 4) if grams else 0.0
    reasons = {str(s.get("id", "")): str(s.get("reason", "")) for s in read_jsonl(skipped)
               if str(s.get("id", "")).startswith(f"{kind}-") and judged(s)}
    dropped = Counter(drop_kind(reason) for rid, reason in reasons.items() if rid not in ids)
    duplicates = dropped["duplicate"] + dropped["near duplicate"]
    coverage = {name: {"used": len(seen[name]), "of": len(LISTS[name]),
                       "fraction": round(len(seen[name]) / len(LISTS[name]), 4)}
                for name in COVERED[kind]}
    return {"records": len(ids), "distinct_ngrams": distinct, "sampled_records": len(sample),
            "dropped": {k: dropped[k] for k in ("duplicate", "near duplicate", "given up")},
            "duplicate_rate": round(duplicates / (len(ids) + duplicates), 4) if ids or duplicates else 0.0,
            "coverage": coverage}


TOTALLED = ("written", "seconds", "requests", "retries", "tokens_in", "tokens_out", "cost", "replies_without_usage")


def all_runs(path: Path, run: dict) -> dict:
    """This run's numbers added to those of the report the runs before it wrote (an older
    version's holds its one run), so that no rerun, finished or resumed, loses their cost (but
    for a run that was killed before it could write its report)."""
    add = lambda a, b: None if a is None or b is None else round(a + b, 4)  # noqa: E731  None: cost unknown
    try:
        old = json.loads(path.read_text())
        before = old.get("all_runs") or {**old["run"], "runs": 1}
        return {"runs": before["runs"] + 1, **{k: add(before.get(k, 0), run[k]) for k in TOTALLED}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no report yet, or not one of ours
        return {"runs": 1, **{k: run[k] for k in TOTALLED}}


def summarize(kind: str, cfg, out: Path, client: llm.Client, counts: Counter, seconds: float, have: int) -> dict:
    """Write the report beside the output, with this run's numbers and those of all runs on the
    output so far; then print the run's summary and the diversity report (after: a stdout
    gone, `| tee` ended by Ctrl-C, must not lose the report, and the run's cost with it)."""
    s, (skipped, path) = client.stats, sidecars(out)
    run = {"written": counts["written"], "seconds": round(seconds, 2), "requests": s.requests,
           "retries": s.retries, "failed_attempts": dict(s.errors), "failed_requests": dict(s.failures),
           "invalid_answers": counts["invalid answers"], "cut_off_answers": counts["cut off"],
           "context_cut_off_answers": counts["context cut off"],
           "unanswered_items": counts["unanswered"], "tokens_in": s.tokens_in, "tokens_out": s.tokens_out,
           # unknown without usage, or without prices: a later run's total would pass for all of it
           "cost": None if s.no_usage or not (client.price_in or client.price_out) else round(s.cost, 4),
           "replies_without_usage": s.no_usage}
    report = {"file": str(out), "kind": kind, "seed": cfg.seed, "model": cfg.model,
              **diversity(kind, out, skipped), "run": run, "all_runs": all_runs(path, run)}
    write_atomic(path, (json.dumps(report, indent=1) + "\n").encode())
    kinds = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
    rate = counts["written"] / seconds if seconds > 0 else 0.0
    dropped, distinct, total = report["dropped"], report["distinct_ngrams"], report["all_runs"]
    coverage = ", ".join(f"{k} {v['fraction']:.0%}" for k, v in report["coverage"].items())
    cuts = []
    if counts["cut off"]:
        cuts.append(f"{counts['cut off']} cut off at --max_tokens={cfg.max_tokens}: raise it to keep such items")
    if counts["context cut off"]:
        cuts.append(f"{counts['context cut off']} cut off by the model's context: {CONTEXT_HINT}")
    cut = f" ({'; '.join(cuts)})" if cuts else ""
    unmetered = f", not counting {s.no_usage} replies without usage" if s.no_usage else ""
    print(f"{kind}: {counts['written']} records written in {seconds:.1f} s ({rate:.2f}/s); {out} holds "
          f"{have}/{cfg.n} of seed {cfg.seed}\n"
          f"requests {s.requests}, retries {s.retries}; failed attempts: {kinds(s.errors)}; failed requests: "
          f"{kinds(s.failures)}; invalid answers {counts['invalid answers']}{cut}; items without an answer "
          f"{counts['unanswered']} (a rerun asks for them again)\n"
          f"tokens {s.tokens_in:,} in, {s.tokens_out:,} out{cost(client, run['cost'])}{unmetered}; "
          f"all runs on this file ({total['runs']}): {total['tokens_in']:,} in, {total['tokens_out']:,} out"
          f"{cost(client, total['cost'])}\n"
          f"dropped (all runs): {dropped['duplicate']} duplicate, {dropped['near duplicate']} near duplicate "
          f"(together {report['duplicate_rate']:.1%} of records and duplicates), {dropped['given up']} given up\n"
          f"distinct 1/2/3/4-grams {' / '.join(f'{v:.3f}' for v in distinct.values())} "
          f"(on {report['sampled_records']} records); coverage: {coverage}\n"
          f"report: {path}", flush=True)
    return report


def check_settings(cfg) -> None:
    """Refuse what the endpoint would refuse on every request, before any is sent (and paid for)."""
    require((cfg.n >= 0, "--n must be >= 0"), (cfg.attempts >= 1, "--attempts must be >= 1"),
            (0 <= cfg.temperature <= 2, "--temperature must be in [0, 2]"),
            (cfg.max_tokens >= 1, "--max_tokens must be >= 1"),
            (0 < cfg.near_dup <= 1, "--near_dup must be in (0, 1]"),
            (cfg.give_up >= 1, "--give_up must be >= 1"), (bool(cfg.model), "--model is needed"))


def main(argv=None):
    cfg, args = parse_args(DEFAULTS, __doc__, argv)
    kind = subcommand(args, KINDS)
    check_settings(cfg)
    client = llm.client_from(cfg, cfg.model)
    out = Path(cfg.out or f"out/{kind}.jsonl")
    if out.name in ("", ".", "..") or out.is_dir():
        raise UserError(f"--out={cfg.out} is a folder: name the JSONL file to write")
    skipped_path, report_path = sidecars(out)
    check_writable(out, skipped_path, report_path)
    have, done = progress(kind, cfg, out, skipped_path)
    counts, error, started, sandbox = Counter(), None, time.monotonic(), None
    with client, contextlib.ExitStack() as held:
        if have < cfg.n:
            try:
                client.check()
            except llm.LLMError as e:
                raise UserError(e.failure.message) from None
        if have < cfg.n or out.exists():  # (a run writing out holds the lock on it, so out exists)
            # one run at a time on an output, held until the report is written: two would ask for
            # the same items and write each twice, and one's report would drop the other's totals
            out.parent.mkdir(parents=True, exist_ok=True)  # check_writable said it can be
            held.enter_context(run_lock(out, f"another run is writing {out}: wait for it, stop it, or use "
                                             f"another --out"))
            have, done = progress(kind, cfg, out, skipped_path)  # again: a run before ours may have ended since
        # to the report's end: a signal stops the work, and the report (the run's cost) is still written
        interrupts = held.enter_context(Interrupts(client.stop))
        if have < cfg.n:
            dedup = Dedup(cfg.near_dup)
            others = known(out, dedup, cfg.model, interrupts.stop)
            if others:  # allowed (a cheaper teacher for the rest, say), but never unsaid
                print(f"note: {out} holds records of another --model "
                      f"({', '.join(f'{n} of {m}' for m, n in others.most_common())}); this run adds "
                      f"{cfg.model}'s, each record naming its model", file=sys.stderr, flush=True)
            if kind == "exercises" and cfg.check_examples:
                sandbox = open_sandbox(min(cfg.concurrency, os.cpu_count() or 1))
            writers = Appender(out), Appender(skipped_path)
            try:
                counts, error = synthesize(kind, cfg, client, dedup, sandbox, *writers, have, done, interrupts.stop)
            finally:
                for writer in writers:
                    try:
                        writer.close()
                    except UserError as e:
                        error = error or str(e)
                if sandbox is not None:
                    sandbox.close()
        try:
            summarize(kind, cfg, out, client, counts, time.monotonic() - started, have + counts["written"])
        except UserError:  # the report cannot be written either (a full disk): the first error says why
            if error is None:
                raise
    if error:
        raise UserError(error)
    if have + counts["written"] < cfg.n:  # stopped by Ctrl-C
        sys.exit(130)


if __name__ == "__main__":
    run(main)
