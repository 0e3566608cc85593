"""Filter web code by educational value, and check training data against the benchmarks.

    python data/prepare.py --source=hf --output=jsonl --name=web_stack  # data/web_stack/part-*.jsonl
    python filter.py annotate --corpus='data/web_stack/*.jsonl' --n=100000 --model=gpt-4 --concurrency=32
    python filter.py embed --ckpt=microsoft/phi-1        # embeds out/annotations.jsonl
    python filter.py train                                # out/forest.npz from the two
    python filter.py apply --corpus='data/web_stack/*.jsonl' --top_fraction=0.17 --shard=0 --num_shards=64
    torchrun --standalone --nproc_per_node=8 filter.py apply --corpus='data/web_stack/*.jsonl' ...
    python filter.py decontaminate --corpus=exercises.jsonl --prune_tau=0.95 --out=pruned.jsonl \\
        --results=out/humaneval/results.jsonl

The paper (section 2.1) had GPT-4 judge ~100K files for "educational value for a
student whose goal is to learn basic coding concepts", trained a random forest on a
pretrained code model's embeddings of them, and kept what the forest predicts to be
educational: ~6B of 35B tokens. Corpora are JSONL, one {"id", "text", ...} per line (a
line without an id is called PATH:LINE, PATH resolved); --corpus takes comma-separated
paths and globs.

annotate   draws --n documents spread over --strata length quantiles in proportion (the
           sample's lengths follow the corpus's without a plain draw's luck; a larger --n
           extends the same draw) and asks the teacher (llm.py: --api_base, else
           $OPENAI_BASE_URL, else OpenAI) for their educational value with our own prompt
           (PROMPT): a score from 0 to 10 on the answer's last line, "Educational value: N".
           parse_score reads the last such label (or "Score: N"), else the last "N/10",
           else a bare number; an answer without one is asked again with a
           reminder, up to --attempts answers, then written as a failure (score null,
           "error"). Records {"id", "score", "answer", "text", "stratum", "model"} are
           appended to --labels as they come; a rerun asks only for the documents without a
           score (warning of scores by another --model), and a document's last line counts.
           A request the teacher refuses (a 4xx, e.g. a prompt too long for its context, or
           an answer without text: a content filter) is its verdict, once it has answered
           another in the same run (a prompt too long for the context: at once): written
           with "refused" (--model, --prompt_chars, --max_tokens,
           --temperature), not asked again by a rerun with those settings, counted in a
           warning; such a document has no score, and train leaves it out. Requests that
           failed otherwise (an outage) end the run in an error, and a rerun asks again; 5
           documents in a row that failed alike (llm.FAILED_ALIKE) end it there, rather than
           each document left retrying for minutes.
           One run at a time writes --labels (a lock). A document with the id of an earlier
           one is not drawn (counted): embed and train know a document by its id and take
           the first, as every stage does. A document is a positive (the label) when its
           score >= --min_score.
embed      embeds --corpus (default: --labels) with --ckpt (our .pt, a Hugging Face phi
           folder or hub id): the mean of the final hidden states (after the last
           LayerNorm) over the document's first --doc_tokens tokens, capped at the model's
           context. A decoder has no summary token, and its last position is shaped to
           predict what comes next rather than to sum up; the mean gives every part of the
           file a say. 2048 is phi-1's context and holds most files whole. Rows are padded
           on the right, which causal attention never lets a real position see, so batches
           need no mask. Writes --embeddings, a float16 .npy (documents x width) in corpus
           order, and NAME.json beside it (format, ids, a digest of each text, count, dim,
           the source and its fingerprint: corpus, model contents, settings, --dtype as
           resolved: another one embeds anew). The work goes chunk by chunk (of 1024
           documents, whatever --batch_size) into NAME.npy.partial; a rerun continues at
           the first unfinished chunk (with any --batch_size: a lower one is the answer to
           running out of memory, which is one line saying so), and the .npy and .json
           appear only once all are done (one run at a time: a lock on NAME.npy.lock,
           there while it runs). Under torchrun each process embeds every world-th chunk on
           its own GPU, and those done first wait for the others for up to a week
           (SHARE_WAIT), not DDP's hour.
train      fits the forest (RandomForest) on the annotated documents' embeddings, keeping
           --holdout of each class aside for accuracy, precision, recall, F1 and AUC (none,
           where that would leave a side with one class), printed with the out-of-bag
           accuracy and saved in the forest (--forest) with the embedding's source. Each
           embedding must be of the text scored (by the digests): a document embedded with
           another text under its id (a corpus edited since) is left out, with a warning;
           more than 5% of them (another corpus, or one made again) are refused.
apply      streams --corpus through the embedding model (the forest's, unless --ckpt; one
           whose weights are not those the forest learned from is noted) and the forest
           a chunk at a time, in constant memory, and writes per shard in
           --out (default out/filtered), I and N five digits (kept-00000-of-00001.jsonl):
             kept-I-of-N.jsonl    the kept documents, each with its "score"
             scores-I-of-N.bin    score (float32) and tokens (uint32) of every document
             scores-I-of-N.json   what made those scores (a fingerprint) and how many: written
                                  once they are whole, it lets any later run use them again
             summary-I-of-N.json  documents and tokens in all and kept, the threshold, a
                                  histogram of the scores; written last
           The score is the forest's probability of the positive class; a document is kept
           at --threshold or above, or with --top_fraction, if it is among the best-scoring
           documents that hold that fraction of the shard's tokens (the threshold read from
           a 10,000-bin histogram that bins scores as they are compared: what is kept holds
           at least the fraction; ties at it are kept, with a note where they keep notably
           more). Shard I of N (--shard, --num_shards) holds lines I, I + N, I + 2N, ... of
           the corpus, however many processes filter it: under torchrun they share its
           chunks (of 1024 documents, every world-th chunk each, scored into one file: --out
           on a file system they all see) and process 0 selects; so machines with any number
           of GPUs each run their own --shard, and a shard run again with another number
           of processes, or another --batch_size, is the same shard; a rerun goes on from
           the chunks it scored (NAME.partial.done: a byte per chunk). A
           shard whose summary names its kept file is done: a rerun skips it, or with
           another --threshold or --top_fraction only selects again from its scores (a
           changed corpus file, by size or modification time, another forest, model or
           --dtype, is scored again, its kept file and scores removed first: --doc_tokens
           is the forest's; a file named another way, or from another folder, is the
           same). One run at a time filters a shard (a lock on I-of-N.lock in --out,
           there while it runs). A --corpus holding files
           apply writes in --out is refused (each run would read the last one's output back
           in), and kept files of another --num_shards in --out are warned of: a glob of
           kept-*.jsonl would take them too (move them to a folder of their own). Running
           out of memory is one line: lower --batch_size.
decontaminate  --corpus (e.g. exercises) against HumanEval and MBPP (--bench): 13-gram
           overlap (lowercased words of the problem's prompt and solution), the L2 distance
           of unit-normalised embeddings (with --ckpt) and the AST match rate tau. Writes
           --report: per problem its closest training document by each measure, and per
           tau (the paper's, from --min_tau, and --min_tau) how many documents and problems
           reach it. With --prune_tau, --out gets the documents whose tau is below it
           against every problem; with --results (evaluate.py's results.jsonl,
           comma-separated for several runs, each named by the end of its path that tells
           it from the others) it prints the paper's Table 3, also kept in the report: per
           tau, the problems with a training document at least that close (similar) and the
           others, with their pass rates. The comparison's results go into
           REPORT.partial as they come: a rerun of an interrupted run goes on where it
           stopped (the same corpus, benchmarks and --min_tau), and the file goes once the
           report is written. One run at a time writes a report, and --out (locks on
           REPORT.lock and OUT.lock).

The AST match rate: tau = 1 - d / max(n1, n2), d being the tree edit distance between
two programs' ASTs of n1 and n2 nodes (Zhang and Shasha's algorithm; inserting, deleting
or relabelling a node costs 1), so 1.0 is the same structure and 0 nothing in common.
A problem is its prompt and solution as one module; a document is compared by its code
units, and its tau is the best of theirs: the document if it parses, else each fenced
code block (a textbook's ```python), else each top-level definition's lines that parse
(one Python 2 line costs only its part); and of each, every top-level function and
class with the imports it uses, alone and with the top-level definitions it uses (a
problem's helpers), so a copy inside a larger file is not diluted by the rest.
Names go before comparing (identifiers, attributes, arguments, imports, keywords: a node
keeps its type only), and so do docstrings (comments never reach the AST); constants keep
their type, not their value (3 matches 4, not "3"); operators and load/store contexts
fold into their parent's label (BinOp:Add). So a trivial one-liner (return sorted(xs),
return n % 2 == 0) has the tree of the smallest MBPP solutions, a match at tau 1.0: a
low --prune_tau removes such documents too, as the measure sees structure only. Exact
distances take O(n1 n2 k1 k2) steps (k: the smaller of depth and leaf count), about 20 ms
for a pair of benchmark-sized functions in Python. As d >= max(n1, n2) - (the labels the
two trees share, counted as multisets), pairs whose bound falls below --min_tau are not
computed; for HumanEval against MBPP at 0.8 the bound leaves 0.3% of the pairs. At the
paper's scale (880K exercises x 664 problems, on --workers processes) that is ~1.5M exact
pairs, some hours of CPU; an embedding pre-filter would cut it further.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import errno
import hashlib
import heapq
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import textwrap
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

import llm
from config import (UserError, alike_on_every_process, counted_lines, file_stamp, first_process, is_number, parse_args,
                    require, run, subcommand)
from data.prepare import (Appender, cannot_write, check_writable, expand, path_id, read_jsonl, run_lock,
                          worker_signals, write_atomic)

DEFAULTS = dict(
    corpus="",  # input JSONL(s): annotate draws from it, embed embeds it (default --labels), apply filters it, ...
    labels="out/annotations.jsonl",  # annotate writes it, embed and train read it
    embeddings="out/embeddings.npy",  # embed writes it (and NAME.json), train reads it
    forest="out/forest.npz",  # train writes it, apply reads it
    out="",  # apply: output folder (default out/filtered); decontaminate: the pruned JSONL
    seed=0,  # the annotation draw, the holdout split and the forest
    # annotate
    n=1000,  # documents to annotate (the paper: ~100K)
    strata=10,  # length quantiles the draw is spread over, in proportion to their sizes
    model="gpt-4",  # the teacher (the paper's annotator)
    **llm.DEFAULTS,  # the client: --api_base, --concurrency, --rpm, --tpm, --timeout, ... (llm.py)
    temperature=0.0,  # the teacher's sampling temperature
    max_tokens=256,  # tokens per answer at most
    attempts=3,  # answers per document without a readable score before it is written as a failure
    prompt_chars=8000,  # characters of a document shown to the teacher (longer ones are cut)
    min_score=6,  # a score of at least this (0-10) makes a document a positive
    # embed (and apply, decontaminate)
    ckpt="",  # embedding model: our .pt, a Hugging Face phi folder or hub id (apply: default the forest's)
    doc_tokens=2048,  # tokens of each document embedded: its first ones
    batch_size=8,  # documents per forward pass
    device="auto",  # auto (cuda if there is one), cpu, cuda, cuda:1, ...
    dtype="auto",  # auto (bfloat16 on GPUs that have it), float32, bfloat16, float16
    # train
    holdout=0.2,  # fraction of the annotated documents kept aside for the metrics (0: none)
    n_trees=100,  # trees in the forest
    max_depth=0,  # depth limit of a tree (0: none)
    max_features="sqrt",  # features tried per split: sqrt, log2, all, a number, or a fraction
    min_samples_leaf=1,  # documents in a leaf at least
    class_weight="balanced",  # balanced (each class weighs the same in all) or none
    workers=0,  # processes growing trees or comparing ASTs (0: one per core)
    # apply
    threshold=0.5,  # keep documents scoring at least this
    top_fraction=0.0,  # or keep the best-scoring documents holding this fraction of the tokens (0: use threshold)
    shard=0,  # this shard's index
    num_shards=1,  # shards the corpus is split into (e.g. one per machine)
    # decontaminate
    bench="humaneval,mbpp",  # benchmarks to check against
    mbpp="",  # mbpp.jsonl (default: where evaluate.py finds it)
    min_tau=0.8,  # AST match rates below this are only bounded, not computed
    prune_tau=0.0,  # write to --out the documents whose tau is below this against every problem (0: no)
    results="",  # evaluate.py results.jsonl files (comma-separated) for the similar / non-similar table
    report="out/decontamination.json",  # decontaminate's findings
)

COMMANDS = ("annotate", "embed", "train", "apply", "decontaminate")
CHUNK = 1024  # documents per chunk: embed's unit of resuming, apply's of streaming; shared out among processes
SHARE_WAIT = datetime.timedelta(days=7)  # how long a process done with its chunks waits for the others
TAUS = (0.95, 0.9, 0.85, 0.8)  # the paper's Table 3
NGRAM = 13
EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION = "phi1-embeddings", 2  # version 2: the texts' digests
MISMATCHED = 0.05  # train refuses when more of the scored documents than this have other texts embedded
SCORES = np.dtype([("score", "<f4"), ("tokens", "<u4")])  # apply's scores-I-of-N.bin
APPLY_OUTPUT = re.compile(r"(?:kept|scores|summary)-\d+-of-\d+\.(?:jsonl|bin|json)")  # the files apply writes in --out


# ---------------------------------------------------------------- corpora

def corpus_files(spec: str) -> list[Path]:
    """The files of a --corpus, which must hold a line that is not blank. Each is opened now:
    one that cannot be read is told before the work on the files before it (hours of scoring
    or comparing; annotate's draw stopped in a traceback)."""
    files, found = expand(spec, "--corpus"), False
    for path in files:
        try:
            with path.open("rb") as f:
                found = found or any(line.strip() for line in f)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not found:
        raise UserError(f"no documents in {', '.join(map(str, files))}: the corpus is empty")
    return files


def documents(files: list[Path], skipped: Counter, shard: int = 0, num_shards: int = 1, wanted=None):
    """(index, id, text, record) of each document: index counts the lines of all files,
    and only lines with index % num_shards == shard (and in wanted, if given) are read.
    A document without an id is called by its file's resolved path and its line number:
    unique however the file was named, and whatever other files share its name."""
    index = -1
    for path in files:
        try:
            f = path.open("rb")
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        where = path.resolve()
        with f:
            for number, line in enumerate(f, 1):
                index += 1
                if index % num_shards != shard or (wanted is not None and index not in wanted):
                    continue
                record = corpus_record(line, skipped)
                if record is not None:
                    yield index, document_id(record, where, number), record["text"], record


def document_id(record: dict, where: Path, number: int) -> str:
    """A document's id: its own, or WHERE:LINE without one ("id": null is none, as for
    prepare.py), the path as prepare.path_id writes it (a name that is not UTF-8 escaped)."""
    doc_id = record.get("id")
    return f"{path_id(str(where))}:{number}" if doc_id is None else str(doc_id)


def corpus_record(line: bytes, skipped: Counter) -> dict | None:
    """The record on a corpus line, or None, counted in skipped by why, for a line that holds
    no document: blank, not UTF-8 (a UTF-16 file, whose lines json.loads would take, cut at its
    \\n bytes and read garbled), not a JSON object with a string "text", or holding a lone
    surrogate, which JSON can spell ("\\ud800") but no UTF-8 output can hold."""
    if not line.strip():
        skipped["blank"] += 1
        return None
    try:
        record = json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError:  # (raw surrogate bytes ED A0-BF too)
        skipped["not UTF-8"] += 1
        return None
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        skipped["not a JSON object with a text"] += 1
        return None
    if b"\\u" in line:  # surrogates come of \\u escapes
        try:
            json.dumps(record, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            skipped["with a lone surrogate (not UTF-8)"] += 1
            return None
    return record


def batched(items, size: int):
    """Lists of size items from an iterable, the last one shorter."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def warn_skipped(skipped: Counter, files: list[Path]) -> None:
    if skipped:
        what = ", ".join(f"{n} {why}" for why, n in skipped.items())
        print(f"warning: skipped lines of {', '.join(map(str, files))}: {what}", file=sys.stderr)


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_digest(text: str) -> str:
    """A document's text in 16 hex digits (8 bytes of blake2b): embed keeps one per document,
    so that train pairs a score only with the embedding of the text scored, not of another
    text under its id (a corpus made again, or edited)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def files_identity(files: list[Path]) -> list:
    """Each file's resolved path, size and modification time: a file rewritten in place,
    shuffled or edited to the same size, is not taken for what was read before (config's
    file_stamp), while the same file named another way (./docs.jsonl, or
    from another folder) is the same, and the work done on it is not done again."""
    return [[str(p.resolve()), *(file_stamp(p) or [None, None])] for p in files]  # None: gone since listed


def local_name(name: str) -> str:
    """A local file or folder by its full path, however it was named; anything else (a hub id) as it is."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def content_identity(name: str) -> list:
    """What a model or file named name stands for: its local_name, and the contents of its
    local files (of a folder, the model's: an output put inside it is not)."""
    from model import weight_files
    return [local_name(name)] + [[p.name, digest(p)] for p in weight_files(Path(name))]


def digest(path: Path) -> str:
    """sha256 of a file, read a megabyte at a time (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_contents(identity: list) -> list:
    """What a model's content_identity says of its weights, whatever its name: its files'
    digests, or for a model without local files (a hub id) its name."""
    return [digest for _, digest in identity[1:]] or identity[:1]


def json_object(path: Path) -> dict:
    """The JSON object in path, or {} where there is none: no file, one cut short, or JSON
    that is no object (a list, null), which no run of ours wrote."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def reserve_space(path: Path) -> None:
    """Take the disk space of path's whole length now: a write through a memory map that a
    full disk has no room for is a crash (SIGBUS), not an error. Where the file system cannot
    reserve (EOPNOTSUPP), the run goes on as before."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise


def partial_path(path: Path) -> Path:
    """Where path is written until it is whole (renamed to path then)."""
    return path.with_name(path.name + ".partial")


def progress_paths(path: Path) -> tuple[Path, Path, Path]:
    """Work on path done a chunk at a time: the unfinished file, what it is the work of (JSON),
    and a byte per chunk (1: done), so that a rerun goes on from the chunks done."""
    partial = partial_path(path)
    return partial, partial.with_name(partial.name + ".json"), partial.with_name(partial.name + ".done")


def make_folder(path: Path) -> None:
    """The folder of output path, made where check_writable said it can be; where it cannot
    (a symlink loop on the way, which check_writable takes for a folder not made yet), one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(path, e) from None


# ---------------------------------------------------------------- annotate

SYSTEM = "You are an experienced teacher of programming who judges teaching material."
PROMPT = """Here is a file of code{cut}:

<file>
{text}
</file>

Judge its educational value for a student whose goal is to learn basic coding concepts:
variables, control flow, functions, data structures, simple algorithms. A file has high
value when it is self-contained, correct and clear, with meaningful names and helpful
comments, and shows such concepts in a way a student can follow and learn from. It has
low value when it is mostly configuration, data, boilerplate or generated code, when it
needs much outside context to understand, or when it is so specialised or convoluted
that a beginner learns nothing from it.

Explain your judgement in at most three sentences. Then write a last line of the form
Educational value: N
where N is a whole number from 0 (none) to 10 (excellent)."""
REMINDER = ("I could not find the score. Answer again with just one line of the form\n"
            "Educational value: N\nwhere N is a whole number from 0 to 10.")
_ASIDE = re.compile(r"[(\[][^()\[\]\n]*[)\]]")  # "(out of 10)", "[0-10]", "(Note: ... Python 2 ...)"
_SCALE = re.compile(r"\b[01]\s*(?:-|–|—|to)\s*10\b|(?:/|\bout\s+of|\bscale\s+of)\s*10\b", re.I)
# after a label, words without a digit, punctuation or "is", then ":", "=" or "is" ("value of this
# code is 7", "value is: 7"; an "is" past a comma or full stop belongs to the prose: "value is low,
# since the file is 5 lines", and so do words after an "is": "value is good: 2 functions"), and the
# number right after it (past markdown or a line break); a number followed by "/5" or "out of 5" is
# on another scale
_AFTER_LABEL = (r"\b(?:(?!\bis\b)[^:=\d\n.,;!?])*?(?:[:=]|\bis\b\s*[:=]?)[\s*_`]*"
                r"(\d+(?:\.\d+)?(?!\w)(?:\s*(?:/|out\s+of)\s*\d)?)")
# what may stand before a label that starts its line: markdown, a list's bullet or number ("2. ", "2) ")
_LINE_START = re.compile(r"[ \t*_#>`-]*(?:\d{1,2}[.)][ \t*_`]+)?")
_VALUE = re.compile(r"\beducational\s+value" + _AFTER_LABEL, re.I)
_SCORE = re.compile(r"\bscore" + _AFTER_LABEL, re.I)
_OUT_OF_TEN = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*10\b", re.I)


def parse_score(answer: str) -> int | None:
    """The score (0-10) in a teacher's answer, read with asides in brackets and the scale
    ("0 to 10", "1-10", "out of 10", "/10") set aside: the number right after its last
    label "Educational value: N" (or "= N", "is N"; words without a digit or punctuation may
    stand between: "Educational value (0-10): N", "educational value of this code is 7"), so
    that neither a number in the explanation ("for Python 3", "value is low, since the file
    is 5 lines") nor prose after the score counts; else after its last "Score: N". A label
    that starts its line (past markdown), as the prompt asks for, outranks one in a sentence
    ("Suggestions to raise the educational value: 1. ..." after the score); else its
    last "N/10" or "N out of 10"; else the answer if it is a bare number. Anything else is
    asked again with a reminder, not guessed at ("see PEP 8"). A number on another scale
    ("4/5") is no score rather than rescaled. Halves round up; outside 0-10, no score."""
    plain = _SCALE.sub(" ", _ASIDE.sub(" ", answer))
    ranked = [[m.group(1) for m in label.finditer(plain)  # "4/5" whole, which the check below refuses
               if not own_line or _LINE_START.fullmatch(plain, plain.rfind("\n", 0, m.start()) + 1, m.start())]
              for own_line in (True, False) for label in (_VALUE, _SCORE)]
    found = next((labelled[-1] for labelled in ranked if labelled), None)
    if found is None:
        found = next(iter(_OUT_OF_TEN.findall(answer)[-1:]), None)
    if found is None:
        bare = answer.strip().strip("*`.").strip()
        found = bare if re.fullmatch(r"\d+(?:\.\d+)?", bare) else None
    if found is None or not re.fullmatch(r"\d+(?:\.\d+)?", found) or not 0 <= float(found) <= 10:
        return None
    return int(float(found) + 0.5)


def draw(files: list[Path], n: int, strata: int, seed: int, skipped: Counter) -> dict[int, int]:
    """index -> stratum of n documents (fewer if the corpus holds fewer), spread over length
    quantiles in proportion to their sizes (quotas). Every line gets a random priority and
    each stratum gives its highest-priority documents, so a larger n extends the draw. Lengths
    are line lengths in bytes; lines that hold no document are counted in skipped, and so
    are documents with the id of an earlier one (two synth.py runs of one --seed): embed
    and train know a document by its id and take the first, so only the first is drawn.
    Ids are compared by their 64-bit hash, held in an array, as the lengths: a set of the
    ids of a corpus of millions of documents would take gigabytes."""
    def lengths_and_ids():
        for path in files:
            where = path.resolve()
            with path.open("rb") as f:
                for number, line in enumerate(f, 1):
                    record = corpus_record(line, skipped)
                    yield (len(line.strip()), hash(document_id(record, where, number))) if record else (0, 0)

    found = np.fromiter(lengths_and_ids(), dtype=[("length", np.int64), ("id", np.int64)])
    lengths, lines = found["length"], np.flatnonzero(found["length"])
    ids = found["id"][lines]
    order = np.argsort(ids, kind="stable")  # the lines of an id in order, the first first
    repeated = np.zeros(len(lines), bool)
    repeated[order[1:]] = ids[order[1:]] == ids[order[:-1]]
    if repeated.any():
        skipped["repeated id"] += int(repeated.sum())
        lines = lines[~repeated]
    if not len(lines):
        return {}
    cuts = np.quantile(lengths[lines], np.linspace(0, 1, strata + 1)[1:-1])
    stratum = np.searchsorted(cuts, lengths[lines], side="right")
    quota = quotas(np.bincount(stratum, minlength=strata), min(n, len(lines)))
    priority = np.random.default_rng(seed).permutation(len(lines))
    picked = {}
    for s in range(strata):
        members = np.flatnonzero(stratum == s)
        for i in members[np.argsort(priority[members])][:quota[s]]:
            picked[int(lines[i])] = s
    return picked


def quotas(sizes: np.ndarray, n: int) -> list[int]:
    """n seats shared among strata of these sizes in proportion, one at a time, each to the
    stratum of the highest size / (seats so far + 1/2), the lowest-numbered of a tie
    (Sainte-Laguë's method, as Webster's). Adding seats never takes one away, so the quotas
    of n + 1 hold those of n: the largest-remainder rule does not (the Alabama paradox). A
    full stratum, size / (size + 1/2) < 1, comes after any other, whose claim is above 1."""
    quota = [0] * len(sizes)
    claims = [(-int(size) / 0.5, s) for s, size in enumerate(sizes) if size]
    heapq.heapify(claims)
    for _ in range(n):
        _, s = heapq.heappop(claims)
        quota[s] += 1
        heapq.heappush(claims, (-int(sizes[s]) / (quota[s] + 0.5), s))
    return quota


def renamed_ids(ids: set, files: list[Path]) -> set[str]:
    """Today's ids of documents without an id of their own that an older filter.py called
    NAME:LINE, before ids held the whole path: those of files whose name no other file of
    the corpus has (of two files of the same name, the old ids cannot tell which is meant)."""
    names = Counter(path.name for path in files)
    unique = {path.name: path.resolve() for path in files if names[path.name] == 1}
    renamed = set()
    for doc_id in ids:
        name, _, line = str(doc_id).rpartition(":")
        if name in unique and line.isdigit():
            renamed.add(f"{unique[name]}:{line}")
    return renamed


def annotation_messages(text: str, cfg) -> list[dict]:
    cut = f" (its first {cfg.prompt_chars} characters)" if len(text) > cfg.prompt_chars else ""
    user = PROMPT.format(cut=cut, text=text[:cfg.prompt_chars])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def check_endpoint(client: llm.Client) -> None:
    try:
        client.check()
    except llm.LLMError as e:
        raise UserError(e.failure.message) from None


def annotate(cfg) -> Counter:
    """Annotate the draw into cfg.labels; returns the counts of scores and failures."""
    if cfg.n < 1 or cfg.strata < 1 or cfg.attempts < 1 or cfg.prompt_chars < 1:
        raise UserError("--n, --strata, --attempts and --prompt_chars must be at least 1")
    # what the endpoint would refuse on every request, refused before the corpus is read
    require((0 <= cfg.temperature <= 2, "--temperature must be in [0, 2]"),
            (cfg.max_tokens >= 1, "--max_tokens must be >= 1"),
            (0 <= cfg.min_score <= 10, "--min_score must be a score from 0 to 10"))
    client = llm.client_from(cfg, cfg.model)
    files = corpus_files(cfg.corpus)
    out = Path(cfg.labels)
    check_apart({"--labels": out}, {"--corpus": files})
    check_writable(out)
    checked = not out.exists()  # a first run: a wrong --model or URL said now, not after the draw reads the corpus
    if checked:
        with client:  # the check's connection closes now; the answers open their own
            check_endpoint(client)
    skipped = Counter()
    picked = draw(files, cfg.n, cfg.strata, cfg.seed, skipped)
    warn_skipped(skipped, files)
    if not picked:
        raise UserError(f"no documents in {', '.join(map(str, files))}")
    if len(picked) < cfg.n:
        print(f"note: the corpus holds {len(picked)} documents, fewer than --n={cfg.n}: all of them are drawn")
    others = Counter(r["model"] for r in read_jsonl(out) if r.get("score") is not None
                     and r.get("model") not in (None, cfg.model))
    if others:
        print(f"warning: resuming with another teacher than {out} had: {sum(others.values())} scores by "
              f"{', '.join(map(str, others))} are kept, and only the documents without one go to --model={cfg.model}; "
              f"another --labels starts afresh", file=sys.stderr)
    scored, refused = done_ids(out, files, cfg)
    todo = {index: (doc_id, text, picked[index]) for index, doc_id, text, _ in
            documents(files, Counter(), wanted=picked) if doc_id not in scored and doc_id not in refused}
    if todo:
        with client:
            if not checked:
                check_endpoint(client)
            make_folder(out)
            # one run at a time on the labels: two would each ask (and pay) for every document
            with run_lock(out, f"another run is annotating into {out}: wait for it, stop it, or use another --labels"):
                scored, refused = done_ids(out, files, cfg)  # again: a run before ours may have ended since
                todo = {index: doc for index, doc in todo.items() if doc[0] not in scored and doc[0] not in refused}
                if todo:
                    return ask_teacher(cfg, client, out, todo, len(picked))
    print(f"{out}: all {len(picked)} documents drawn are annotated"
          + (f" (the teacher refused {len(refused)} of its documents for good: they have no score)" if refused else ""))
    return Counter()


def request_settings(cfg) -> dict:
    """What a refusal is a verdict on besides the document: another --model may take it, and
    one refused as too long for the teacher's context fits with a lower --prompt_chars."""
    return dict(model=cfg.model, prompt_chars=cfg.prompt_chars, max_tokens=cfg.max_tokens,
                temperature=cfg.temperature)


def done_ids(out: Path, files: list[Path], cfg) -> tuple[set, set]:
    """The ids of the documents with a score in out (and today's ids of those an older
    filter.py named), and of those without one that the teacher refused for good with these
    request_settings: a rerun asks for neither."""
    scored, refused, settings = set(), set(), request_settings(cfg)
    for r in read_jsonl(out):
        if r.get("score") is not None:
            scored.add(r.get("id"))
        elif r.get("refused") == settings:
            refused.add(r.get("id"))
    return scored | renamed_ids(scored, files), refused - scored


def ask_teacher(cfg, client: llm.Client, out: Path, todo: dict, drawn: int) -> Counter:
    """Annotate the documents of todo into out; returns the counts of scores and failures.

    A request the teacher refused (a 4xx such as a prompt too long for its context, or an
    answer without text: a content filter) is its verdict on the document: written with
    "refused" (its request_settings), it is not asked again by a rerun with those settings.
    That takes a teacher that answers other requests of this run (scores from before may be
    another endpoint's): one that refuses every request says that a setting or the endpoint
    is at fault, not the documents, and its refusals are written as failures, asked again.
    A prompt refused as too long for the context is a verdict at once: it is the document's."""
    print(f"annotating {len(todo)} documents ({drawn - len(todo)} of {drawn} done before) into {out}")
    writer, counts = Appender(out), Counter()
    conversations = {}  # those of the documents asked again
    unanswered = []  # the failures of requests that failed for good, but for refusals
    answered = False  # an answer came: the teacher takes this run's requests
    alike = []  # the failures of the last documents, if they failed for good alike, with no answer between
    refusals, held = [], []  # the refusals; the records of those not yet known to be verdicts

    def conversation(index: int) -> list[dict]:
        return conversations.get(index) or annotation_messages(todo[index][1], cfg)

    def verdict(record: dict) -> None:
        writer.write(dict(record, refused=request_settings(cfg)))
        counts["refused"] += 1

    try:
        with tqdm(total=len(todo), desc="annotating") as bar:
            pending = list(todo)
            for attempt in range(1, cfg.attempts + 1):
                again = []
                answers = client.map(((i, conversation(i)) for i in pending), max_tokens=cfg.max_tokens,
                                     temperature=cfg.temperature)
                for index, result in answers:
                    if isinstance(result, llm.Failure) and result.fatal:
                        raise UserError(f"the teacher refuses: {result}")
                    answer = result.text if isinstance(result, llm.Reply) else None
                    if answer is not None or result.kind == "refused":  # the teacher is there
                        alike = []
                    elif alike and not result.alike(alike[-1]):
                        alike = [result]
                    else:
                        alike.append(result)
                    score = None if answer is None else parse_score(answer)
                    if answer is not None and not answered:  # it takes our requests: a refusal is a verdict
                        answered = True
                        for record in held:
                            verdict(record)
                        held = []
                    if answer is not None and score is None and attempt < cfg.attempts:
                        conversations[index] = conversation(index) + [{"role": "assistant", "content": answer},
                                                                       {"role": "user", "content": REMINDER}]
                        again.append(index)
                        continue
                    doc_id, text, stratum = todo[index]
                    record = dict(id=doc_id, score=score, answer=answer, text=text, stratum=stratum,
                                  model=cfg.model)
                    bar.update()
                    if answer is None and result.kind == "refused":
                        refusals.append(result)
                        record["error"] = f"refused: {result}"
                        if answered or result.too_long:
                            verdict(record)
                        else:
                            held.append(record)
                        continue
                    if score is None:
                        record["error"] = (f"request failed: {result}" if answer is None else
                                           f"no score in {attempt} answers")
                        if answer is None:
                            unanswered.append(result)
                    writer.write(record)
                    counts["failed" if score is None else score] += 1
                    if len(alike) >= llm.FAILED_ALIKE:  # an outage: every other document would retry for minutes
                        answers.close()  # (its threads stop; the requests in flight are asked by a rerun)
                        break
                if len(alike) >= llm.FAILED_ALIKE:
                    break
                pending = again
            stats = client.stats
        for record in held:  # no answer came: failures, which a rerun asks again
            writer.write(record)
            counts["failed"] += 1
    finally:
        writer.close()
    scores = {k: v for k, v in counts.items() if k not in ("failed", "refused")}
    positive = sum(v for k, v in scores.items() if k >= cfg.min_score)
    print(f"scores: {', '.join(f'{k}: {scores[k]}' for k in sorted(scores))}; failed: {counts['failed']}; "
          f"refused: {counts['refused']}; positive (score >= {cfg.min_score}): {positive} of {sum(scores.values())}")
    print(f"requests {stats.requests}, retries {stats.retries}, tokens {stats.tokens_in:,} in, "
          f"{stats.tokens_out:,} out" + (f", cost ${stats.cost:.2f}" if stats.cost else ""))
    if refusals:
        too_long = sum(f.too_long for f in refusals)
        hint = (f"; {too_long} of them too long for its context: a lower --prompt_chars (now {cfg.prompt_chars}) "
                f"or --max_tokens asks again" if too_long else "")
        if held:
            raise UserError(f"the teacher refused {len(held)} requests and answered none (first: {refusals[0]}){hint}; "
                            f"does {client.api_base} take the settings sent (--model, --max_tokens, --temperature)? "
                            f"A rerun asks for them again")
        print(f"warning: the teacher refused {len(refusals)} documents for good (first: {refusals[0]}){hint}; "
              f"they have no score, train leaves them out, and a rerun with the same --model, --prompt_chars, "
              f"--max_tokens and --temperature does not ask again", file=sys.stderr)
    if unanswered:
        stopped = (f"; the last {len(alike)} failed alike, so the run stopped there: is {client.api_base} working?"
                   if len(alike) >= llm.FAILED_ALIKE else "")
        raise UserError(f"{len(unanswered)} documents got no answer (first: {unanswered[0]}){stopped}; "
                        f"rerun the same command to ask again")
    if not scores and counts["failed"] and len(todo) == drawn:  # a teacher that does not follow the prompt
        raise UserError(f"none of the {counts['failed']} answers held a score (\"Educational value: N\"); "
                        f"they are in {out}: is --model={cfg.model} one that follows the prompt?")
    return counts


# ---------------------------------------------------------------- embeddings

def start_processes(cfg):
    """(rank, world size, device) of this process; under torchrun, in its process group, on its own GPU."""
    from train import setup_processes
    try:
        return setup_processes(cfg.device)
    except RuntimeError as e:
        raise UserError(f"--device={cfg.device}: {e}") from None


@contextlib.contextmanager
def each_its_share(world: int, device):
    """Wraps the work each process does its own share of (holding no collective inside), which
    may take one far longer than another (embed's chunks that an interrupted run left): at the
    end the processes wait for each other on a gloo group of their own, for SHARE_WAIT, not the
    process group's hour (train.DDP_TIMEOUT), which would end a wait longer than that in a
    traceback. Then, as train.together, a UserError on any stops every process, said once."""
    import torch.distributed as dist

    from train import together
    group = dist.new_group(backend="gloo", timeout=SHARE_WAIT) if world > 1 else None
    with together(world, device):
        error = None
        try:
            yield
        except UserError as e:
            error = e
        if group is not None:
            dist.barrier(group=group)
        if error is not None:
            raise error


def load_embedder(cfg, ckpt: str, device):
    """The embedding model, in eval mode on device."""
    from model import load_model, pick_dtype
    return load_model(ckpt, device, pick_dtype(cfg.dtype, device))


def embedding_dtype(cfg, device) -> str:
    """The dtype load_embedder runs the model in on device ("auto" resolved): embeddings
    made in bfloat16 differ from float32 ones (or overflow), so it is part of their
    fingerprint, and of apply's scores'."""
    from model import pick_dtype
    return str(pick_dtype(cfg.dtype, device)).removeprefix("torch.")


def embed_texts(model, texts: list[str], doc_tokens: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The embedding of each text (float32, N x width): the mean of the final hidden states
    over its first doc_tokens tokens; and each text's number of tokens in all."""
    import torch

    import tokenizer
    limit = min(doc_tokens, model.config.block_size)
    encoded = tokenizer.encode_batch(texts)
    seqs = [ids[:limit] or [tokenizer.EOT] for ids in encoded]
    device = next(model.parameters()).device
    out = np.empty((len(texts), model.config.n_embd), np.float32)
    order = np.argsort([-len(s) for s in seqs], kind="stable")  # similar lengths together: little padding
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                lengths = torch.tensor([len(seqs[i]) for i in rows])
                idx = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
                for r, i in enumerate(rows):
                    idx[r, :len(seqs[i])] = torch.tensor(seqs[i])
                positions = torch.arange(idx.shape[1])
                hidden = model.hidden_states(idx.to(device), positions.to(device)).float()
                mask = (positions[None] < lengths[:, None]).to(device)
                pooled = (hidden * mask[..., None]).sum(1) / lengths[:, None].to(device)
                out[rows] = pooled.cpu().numpy()
    except (RuntimeError, MemoryError) as e:
        from train import out_of_memory
        if not out_of_memory(e):
            raise
        raise UserError(f"out of memory: lower --batch_size (now {batch_size}) "
                        f"({str(e).strip().splitlines()[0][:300]})") from None
    return out, np.array([len(ids) for ids in encoded], dtype=np.int64)


def embedding_paths(out: Path) -> tuple[Path, Path, Path, Path, Path]:
    """The description beside the .npy, the unfinished array with its description and chunk
    flags, and the lock of the run writing them."""
    return out.with_suffix(".json"), *progress_paths(out), out.with_name(out.name + ".lock")


def embedded(out: Path, sidecar: Path, fp: str) -> bool:
    """Whether out holds the embeddings of fingerprint fp, whole."""
    return out.is_file() and json_object(sidecar).get("fingerprint") == fp


def embed(cfg) -> Path:
    """Embed the documents of cfg.corpus (default cfg.labels) into cfg.embeddings."""
    with alike_on_every_process():  # the command line's mistakes, said once under torchrun
        files = corpus_files(cfg.corpus or cfg.labels)
        out = Path(cfg.embeddings)
        if out.suffix != ".npy":
            raise UserError(f"--embeddings must name a .npy file, not {out}")
        if not cfg.ckpt:
            raise UserError("--ckpt is needed: the embedding model (our .pt, a Hugging Face phi folder or hub id)")
        if cfg.doc_tokens < 1 or cfg.batch_size < 1:
            raise UserError("--doc_tokens and --batch_size must be at least 1")
        check_writable(out)
        sidecar, partial, partial_meta, flags_path, lock = embedding_paths(out)
        corpus_option = "--corpus" if cfg.corpus else "--labels"
        check_apart({"--embeddings": out}, {corpus_option: files, "--ckpt": [Path(cfg.ckpt)]})
        for beside in (sidecar, partial, partial_meta, flags_path, lock):  # written (or removed) beside the array
            for path in files:
                if same_file(beside, path):
                    raise UserError(f"--embeddings={out} keeps {beside} beside it, the file {corpus_option} names: "
                                    f"writing that would overwrite it; give --embeddings another name")
        skipped, indices, ids, digests, seen = Counter(), [], [], [], set()
        for index, doc_id, text, _ in documents(files, skipped):
            if doc_id in seen:  # e.g. an annotation retried: the same document again
                skipped["repeated id"] += 1
                continue
            seen.add(doc_id)
            indices.append(index)
            ids.append(doc_id)
            digests.append(text_digest(text))
        if first_process():
            warn_skipped(skipped, files)
        if not ids:
            raise UserError(f"no documents in {', '.join(map(str, files))}")
        # a local model by its full path: the forest trained on these names it, for apply run from anywhere
        ckpt = local_name(cfg.ckpt)
        from model import pick_device
        dtype = embedding_dtype(cfg, pick_device(cfg.device))  # (a bad --device or --dtype)
        source = dict(corpus=files_identity(files), ckpt=ckpt, doc_tokens=cfg.doc_tokens, dtype=dtype)
        model_identity = content_identity(ckpt)
        fp = fingerprint(EMBEDDINGS_FORMAT, source, model_identity, ids)
    if embedded(out, sidecar, fp):
        if first_process():
            meta = json_object(sidecar)
            if "digests" not in meta:  # an older filter.py's: these are the texts, as the files are those embedded
                write_atomic(sidecar, json.dumps(dict(meta, version=EMBEDDINGS_VERSION, digests=digests)).encode())
            print(f"{out} already holds these embeddings")
        return out

    rank, world, device = start_processes(cfg)
    from train import together
    with together(world, device):  # a mistake stops every process, and is said once
        model = load_embedder(cfg, cfg.ckpt, device)
    # chunks of CHUNK documents whatever --batch_size: a rerun with a lower one (out of memory) goes on
    n, dim = len(ids), model.config.n_embd
    n_chunks = -(-n // CHUNK)
    state = dict(format=EMBEDDINGS_FORMAT, fingerprint=fp, count=n, dim=dim, chunk=CHUNK)
    with contextlib.ExitStack() as held:  # rank 0's lock, held to the end
        with together(world, device):  # (and a barrier: the array is there for all)
            if rank == 0:
                make_folder(out)
                # one run at a time: two would write one array, and one would reset the chunks the other did
                held.enter_context(run_lock(lock, f"another run is embedding into {out}: wait for it, stop it, "
                                                  f"or use another --embeddings", remove=True))
                if not embedded(out, sidecar, fp):  # (a run before ours may have made them since)
                    for stale in (out, sidecar):  # nothing of an older run may look complete
                        stale.unlink(missing_ok=True)
                    try:
                        resume = (json.loads(partial_meta.read_text()) == state
                                  and flags_path.stat().st_size == n_chunks
                                  and np.load(partial, mmap_mode="r").shape == (n, dim))
                    except (OSError, ValueError, EOFError):  # EOFError: an empty file
                        resume = False
                    try:
                        if not resume:
                            np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(n, dim)).flush()
                            flags_path.write_bytes(bytes(n_chunks))
                            write_atomic(partial_meta, json.dumps(state).encode())
                        reserve_space(partial)
                    except OSError as e:  # a full disk: a rerun goes on from what is there
                        raise cannot_write(out, e) from None
        if embedded(out, sidecar, fp):  # every process sees what process 0 saw under the lock
            if rank == 0:
                print(f"{out} already holds these embeddings")
            return out
        array = np.load(partial, mmap_mode="r+")
        flags = np.memmap(flags_path, dtype=np.uint8, mode="r+")
        mine = [c for c in range(rank, n_chunks, world) if not flags[c]]
        if rank == 0 and flags.any() and mine:
            print(f"resuming: {int(flags.sum())} of {n_chunks} chunks done before")
        wanted = {indices[p]: p for c in mine for p in range(c * CHUNK, min(n, (c + 1) * CHUNK))}
        with each_its_share(world, device):
            texts = []
            with tqdm(total=len(wanted), desc=f"embedding{f' (rank {rank})' if world > 1 else ''}",
                      disable=not wanted) as bar:
                for index, _, text, _ in documents(files, Counter(), wanted=wanted):
                    texts.append(text)
                    p = wanted[index]
                    c = p // CHUNK
                    if p == min(n, (c + 1) * CHUNK) - 1:  # the chunk's last document
                        array[c * CHUNK:p + 1] = embed_texts(model, texts, cfg.doc_tokens, cfg.batch_size)[0]
                        array.flush()
                        flags[c] = 1
                        flags.flush()
                        bar.update(len(texts))
                        texts = []
        if rank == 0:
            if not flags.all():
                raise UserError(f"{partial}: {int((flags == 0).sum())} chunks were not embedded "
                                f"(did {flags_path} change?)")
            if files_identity(files) != source["corpus"]:  # its digests are of the texts read before embedding
                raise UserError(f"{cfg.corpus or cfg.labels} changed while it was embedded: rerun")
            del array
            # with the model's contents (kept out of the fingerprint's source: embeddings made before stay
            # valid), which the forest keeps, so that apply tells another model than the one it learned from
            meta = dict(format=EMBEDDINGS_FORMAT, version=EMBEDDINGS_VERSION, count=n, dim=dim, dtype="float16",
                        fingerprint=fp, source=dict(source, doc_tokens=min(cfg.doc_tokens, model.config.block_size),
                                                    model=model_identity), ids=ids, digests=digests)
            # the description first: a kill before the rename leaves the chunks done, for a rerun to rename
            # (an array renamed without its description would be made anew)
            write_atomic(sidecar, json.dumps(meta).encode())
            os.replace(partial, out)
            partial_meta.unlink()
            flags_path.unlink()
            print(f"{out}: {n} embeddings of width {dim} (float16); ids and source in {sidecar}")
    return out


def load_embeddings(path: Path) -> tuple[list[str], np.ndarray, dict]:
    """(ids, array (memory-mapped float16, N x width), description) of embed's output, or
    one line saying why it is not a complete, intact one."""
    sidecar, partial, _, _, _ = embedding_paths(path)
    if not path.is_file():
        unfinished = " (an unfinished run is there: rerun filter.py embed)" if partial.exists() else ""
        raise UserError(f"no embeddings at {path}{unfinished}")
    try:
        meta = json.loads(sidecar.read_text())
        if not isinstance(meta, dict) or meta.get("format") != EMBEDDINGS_FORMAT:
            raise ValueError("not an embeddings description")
        count, dim, ids = int(meta["count"]), int(meta["dim"]), meta["ids"]
        if len(meta.get("digests", ids)) != len(ids):
            raise ValueError(f"{len(meta['digests'])} digests of texts for {len(ids)} ids")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: its description {sidecar} is missing or broken ({e})") from None
    try:
        array = np.lib.format.open_memmap(path, mode="r")  # np.load would read other bytes as a pickle
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt: {e}") from None
    if array.dtype != np.float16 or array.shape != (count, dim) or len(ids) != count:
        raise UserError(f"{path} is corrupt: a {array.dtype} array of shape {array.shape}, where {sidecar} "
                        f"describes float16 ({count}, {dim}) with {len(ids)} ids")
    return ids, array, meta


# ---------------------------------------------------------------- the random forest

FOREST_FORMAT, FOREST_VERSION = "phi1-random-forest", 1
_WORK: dict = {}  # what the tree-growing processes share: set before they fork, never copied to them
GROUP_ENTRIES = 1 << 21  # (row, candidate feature) pairs a group of trees sorts per level, at most


class RandomForest:
    """Breiman's random forest of CART classification trees (gini impurity), in numpy.

    Each tree grows on a bootstrap sample (n rows drawn with replacement; a row drawn k
    times weighs k) and tries max_features features drawn afresh at each split (where
    all of them are constant in the node, it draws on, one at a time, until one varies,
    as scikit-learn does), until a node is pure, has fewer than 2 x min_samples_leaf
    rows, no feature varies in it, or it is at max_depth. With class_weight "balanced"
    each class weighs n / (classes x its count) in all (or pass a dict class -> weight):
    the weight multiplies a row's bootstrap count, as in scikit-learn before it drew the
    bootstrap rows with the weights as probabilities (1.9 does, which moves predict_proba
    toward the rare class; here, with leaves grown pure, the weights change the splits
    more than the leaves' shares).
    A tree's leaf holds its rows' class shares; predict_proba is their mean over the
    trees, as in scikit-learn's RandomForestClassifier. Fit also sets oob_score_
    (accuracy of each row's prediction by the trees that did not see it), oob_proba_ and
    feature_importances_ (mean decrease of weighted impurity).

    Why it is fast in numpy:
    - every feature is binned once into at most max_bins bins: edges at midpoints
      between distinct values where there are few, else at quantiles. Splits are
      searched between bins and stored as "x <= threshold" (float32), the threshold
      halfway across the empty bins between the two sides (as exact CART cuts halfway
      between two values), so predictions need no binning.
    - a tree grows a level at a time, all of the level's nodes together. Each (row of a
      node, candidate feature of that node) becomes one 64-bit key, node | feature |
      bin | row, and one sort of them lines up every node's rows by bin for every
      candidate feature; cumulative class weights along that order are the left side
      of every possible split at once, and a segmented argmax picks each node's best.
      No Python runs per node, so a level of 10,000 small nodes costs what one node of
      their rows would. Levels of large nodes use class-weight histograms (bincount,
      then cumulative sums over the bins) instead of the sort.
    - small trees grow several at once, large ones alone, in parallel processes (fork)
      that share the binned uint8 matrix.
    - trees are flat arrays (feature, -1 at a leaf; threshold; left and right child;
      value), walked for all trees and rows at once, a level per step.

    Saved as an .npz of those arrays and a JSON header with a format tag and version,
    read with np.load(allow_pickle=False). `info`, a JSON-able dict, travels with it.
    """

    def __init__(self, n_trees=100, max_depth=None, max_features="sqrt", min_samples_leaf=1, seed=0, n_jobs=-1,
                 class_weight=None, max_bins=256, progress=False):
        if n_trees < 1 or min_samples_leaf < 1 or not 2 <= max_bins <= 256 or (max_depth is not None and max_depth < 0):
            raise ValueError("need n_trees >= 1, min_samples_leaf >= 1, 2 <= max_bins <= 256 and max_depth >= 0")
        if not (max_features in (None, "sqrt", "log2", "all") or (type(max_features) is int and max_features > 0)
                or (type(max_features) is float and 0 < max_features <= 1)):
            raise ValueError(f"max_features must be sqrt, log2, all, a positive int or fraction, not {max_features!r}")
        self.n_trees, self.max_depth, self.max_features = n_trees, max_depth, max_features
        self.min_samples_leaf, self.seed, self.n_jobs = min_samples_leaf, seed, n_jobs
        self.class_weight, self.max_bins, self.progress = class_weight, max_bins, progress
        self.info: dict = {}

    def _params(self) -> dict:
        return dict(n_trees=self.n_trees, max_depth=self.max_depth, max_features=self.max_features,
                    min_samples_leaf=self.min_samples_leaf, seed=self.seed, class_weight=self.class_weight,
                    max_bins=self.max_bins)

    def _candidates(self, d: int) -> int:
        """Features tried per split, of d."""
        f = self.max_features
        k = (d if f in (None, "all") else int(math.sqrt(d)) if f == "sqrt" else int(math.log2(d)) if f == "log2"
             else int(f * d) if type(f) is float else f)
        return min(d, max(1, k))

    def _check(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or (hasattr(self, "n_features_") and X.shape[1] != self.n_features_):
            want = f"(rows, {self.n_features_})" if hasattr(self, "n_features_") else "(rows, features)"
            raise ValueError(f"X must have shape {want}, not {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X holds NaN or infinite values")
        return X

    def fit(self, X, y) -> "RandomForest":
        X, y = self._check(X), np.asarray(y)
        n, d = X.shape
        if y.shape != (n,) or n < 2 or d < 1:
            raise ValueError(f"need y of shape ({n},), at least 2 rows and a feature")
        if y.dtype.kind == "f" and np.isnan(y).any():  # np.unique makes NaN a class of its own
            raise ValueError("y holds NaN")
        self.n_features_ = d
        self.classes_, label = np.unique(y, return_inverse=True)
        counts = np.bincount(label)
        if self.class_weight == "balanced":
            class_weight = n / (len(counts) * counts)
        elif isinstance(self.class_weight, dict):
            class_weight = np.array([float(self.class_weight.get(c, 1.0)) for c in self.classes_.tolist()])
            if not (class_weight > 0).all():
                raise ValueError("class weights must be positive")
        elif self.class_weight is None:
            class_weight = np.ones(len(counts))
        else:
            raise ValueError(f"class_weight must be None, 'balanced' or a dict, not {self.class_weight!r}")
        edges = bin_edges(X, self.max_bins, np.random.default_rng([self.seed, 1 << 32]))
        table = np.full((d, self.max_bins), np.inf, dtype=np.float32)
        for f, e in enumerate(edges):
            table[f, :len(e)] = e
        _WORK.update(bins=binned(X, edges), label=label, weight=class_weight[label], classes=len(counts),
                     m=self._candidates(d), min_leaf=self.min_samples_leaf, seed=self.seed,
                     max_depth=np.iinfo(np.int32).max if self.max_depth is None else self.max_depth)
        # small trees grow several at a time, so numpy's per-call cost is shared; the groups
        # depend on the data alone, so the forest is the same on any number of processes
        size = int(np.clip(GROUP_ENTRIES // (n * _WORK["m"]), 1, 8))
        groups = [range(t, min(t + size, self.n_trees)) for t in range(0, self.n_trees, size)]
        jobs = min(len(groups), len(os.sched_getaffinity(0)) if self.n_jobs in (-1, None) else self.n_jobs)
        trees, pool = [], None
        try:
            pool = (multiprocessing.get_context("fork").Pool(jobs, worker_signals, (os.getpid(),)) if jobs > 1
                    else None)
            with tqdm(total=self.n_trees, desc="growing trees", disable=not self.progress) as bar:
                for grown in (pool.imap(grow_trees, groups) if pool else map(grow_trees, groups)):
                    trees += grown
                    bar.update(len(grown))
        finally:
            _WORK.clear()
            if pool:
                pool.terminate()

        sizes = [len(t["feature"]) for t in trees]
        self.roots_ = np.cumsum([0] + sizes[:-1]).astype(np.int64)
        self.feature_ = np.concatenate([t["feature"] for t in trees])
        # the cut in the middle of the gap between the two sides' bins, as exact CART cuts halfway
        # between the two sides' values (a leaf's low and high are 0: its threshold is unused)
        feature, low, high = (np.maximum(self.feature_, 0), np.concatenate([t["low"] for t in trees]),
                              np.concatenate([t["high"] for t in trees]))
        self.threshold_ = ((table[feature, low].astype(np.float64) + table[feature, np.maximum(high, 1) - 1]) / 2
                           ).astype(np.float32)
        self.left_, self.right_ = (np.concatenate([np.where(t[side] >= 0, t[side] + r, -1) for t, r in
                                                   zip(trees, self.roots_)]) for side in ("left", "right"))
        self.value_ = np.concatenate([t["value"] for t in trees])
        self.feature_importances_ = np.mean([t["importance"] for t in trees], axis=0)
        if self.feature_importances_.sum() > 0:
            self.feature_importances_ /= self.feature_importances_.sum()
        tree = np.concatenate([np.full(len(t["oob"]), i) for i, t in enumerate(trees)])
        row = np.concatenate([t["oob"] for t in trees])
        leaves = route(X, self.feature_, self.threshold_, self.left_, self.right_, self.roots_[tree], row)
        total = np.stack([np.bincount(row, weights=self.value_[leaves, c], minlength=n) for c in range(len(counts))], 1)
        seen = np.bincount(row, minlength=n)
        with np.errstate(invalid="ignore"):
            self.oob_proba_ = total / seen[:, None]  # NaN for rows that every tree drew
        self.oob_score_ = float((total.argmax(1) == label)[seen > 0].mean()) if seen.any() else float("nan")
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, (rows, classes) in the order of classes_."""
        if not hasattr(self, "roots_"):
            raise ValueError("the forest is not fitted: fit() it, or RandomForest.load() one")
        X = self._check(X)
        out = np.empty((len(X), len(self.classes_)))
        step = max(1, (1 << 21) // len(self.roots_))  # rows routed at once through all trees
        for start in range(0, len(X), step):
            rows = len(X[start:start + step])
            leaves = route(X[start:start + step], self.feature_, self.threshold_, self.left_, self.right_,
                           np.repeat(self.roots_, rows), np.tile(np.arange(rows), len(self.roots_)))
            out[start:start + step] = self.value_[leaves.reshape(len(self.roots_), rows)].mean(0, dtype=np.float64)
        return out

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # first: a forest not fitted has no classes_
        return self.classes_[proba.argmax(1)]

    def save(self, path) -> None:
        """Write the forest to path (an .npz), through a temporary file."""
        path = Path(path)
        header = dict(format=FOREST_FORMAT, version=FOREST_VERSION, n_features=self.n_features_,
                      classes=self.classes_.tolist(), params=self._params(), oob_score=self.oob_score_, info=self.info)
        arrays = dict(header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), roots=self.roots_,
                      feature=self.feature_, threshold=self.threshold_, left=self.left_, right=self.right_,
                      value=self.value_, feature_importances=self.feature_importances_)
        tmp = path.with_name(f"{path.name}.{os.urandom(4).hex()}.tmp")  # its own: two runs may save one forest
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failure leaves no half-written file behind

    @classmethod
    def load(cls, path) -> "RandomForest":
        """A forest that save() wrote; ValueError (FileNotFoundError) for anything else."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no forest at {path}")
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # else np.load reads any other bytes as a refused pickle
                raise ValueError(f"{path} is not a random forest file (not an .npz archive)")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a random forest file ({type(e).__name__}: {e})") from None
        try:
            header = json.loads(arrays.pop("header").tobytes())
            kind, version = header.get("format"), header.get("version")
        except (KeyError, ValueError, AttributeError):
            raise ValueError(f"{path} is an .npz archive but not a random forest (no header)") from None
        if kind != FOREST_FORMAT:
            raise ValueError(f"{path} is a {kind!r} file, not a {FOREST_FORMAT!r} one")
        if version != FOREST_VERSION:
            raise ValueError(f"{path} is version {version} of {FOREST_FORMAT}; this filter.py reads version "
                             f"{FOREST_VERSION}")
        try:
            forest = cls(**header["params"])
            forest.info, forest.n_features_, forest.oob_score_ = (header["info"], int(header["n_features"]),
                                                                  header["oob_score"])
            forest.classes_ = np.array(header["classes"])
            for name in ("roots", "feature", "threshold", "left", "right", "value", "feature_importances"):
                setattr(forest, name + "_", arrays[name])
            if not forest.sound():
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path} is a damaged {FOREST_FORMAT} file (arrays missing or inconsistent)") from None
        return forest

    def sound(self) -> bool:
        """Whether the arrays are a forest that predict_proba can walk: each tree's nodes after
        its root, children after their parent within the tree (a loop would walk for ever),
        features of X, finite thresholds, class shares in [0, 1]. (A file damaged at random
        fails its CRC first; this is for one written whole, but wrong.)"""
        roots, feature, left, right = self.roots_, self.feature_, self.left_, self.right_
        n = len(feature)
        if not (all(a.ndim == 1 and a.dtype.kind == "i" for a in (roots, feature, left, right))
                and self.threshold_.shape == (n,) and self.value_.shape == (n, len(self.classes_))
                and all(len(a) == n for a in (left, right)) and n > 0 and len(roots) > 0):
            return False
        node = np.arange(n)
        end = np.r_[roots[1:], n][np.clip(np.searchsorted(roots, node, side="right") - 1, 0, None)]  # tree's end
        inner = feature >= 0
        return bool(roots[0] == 0 and (np.diff(roots) > 0).all() and roots[-1] < n
                    and (feature >= -1).all() and (feature < self.n_features_).all()
                    and (node < left)[inner].all() and (node < right)[inner].all()
                    and (left < end)[inner].all() and (right < end)[inner].all()
                    and np.isfinite(self.threshold_[inner]).all()  # a leaf's is unused (inf: no edge)
                    and np.isfinite(self.value_).all() and ((self.value_ >= 0) & (self.value_ <= 1)).all())


def bin_edges(X: np.ndarray, max_bins: int, rng, sample: int = 200_000) -> list[np.ndarray]:
    """Per feature, at most max_bins - 1 increasing float32 thresholds, from (a sample of) X:
    midpoints between the distinct values if there are at most max_bins, else quantiles."""
    rows = X if len(X) <= sample else X[np.sort(rng.choice(len(X), sample, replace=False))]
    edges = []
    for column in np.sort(rows, axis=0).T:
        starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
        distinct = column[starts]
        if len(distinct) <= max_bins:
            low, high = distinct[:-1], distinct[1:]
            mid = ((low.astype(np.float64) + high) / 2).astype(np.float32)
            edges.append(np.where(mid < high, mid, low))  # a midpoint that rounds up to high would not split
        else:
            edges.append(quantile_edges(distinct, np.diff(np.r_[starts, len(column)]), max_bins))
    return edges


def quantile_edges(values: np.ndarray, counts: np.ndarray, max_bins: int) -> np.ndarray:
    """At most max_bins - 1 of the sorted distinct values (a bin: x <= edge), each bin about
    as full. A value that fills a bin by itself (the zeros of a sparse feature) gets a bin of
    its own, and the other values share the rest at the quantiles of their rows: quantiles of
    all rows put most edges on that one value, where they fell into one (90% zeros left 28
    bins for the values that vary). Without such a value: the quantiles of all rows."""
    total, last = counts.sum(), len(values) - 1  # the last value needs no edge: nothing is above it
    heavy = np.flatnonzero(counts * max_bins >= total)
    own = np.union1d(heavy, heavy - 1)  # edges at a heavy value and at the value below it
    own = own[(own >= 0) & (own < last)]
    budget = max_bins - 1 - len(own)
    if budget < 0:  # many heavy values: each takes about one quantile of all rows anyway
        own, heavy, budget = own[:0], heavy[:0], max_bins - 1
    rows = counts.copy()
    rows[heavy] = 0  # the heavy values add no rows: never picked below
    light = np.cumsum(rows)  # the other values' rows up to each value
    # the value where those rows pass each quantile position
    picked = np.searchsorted(light, (np.arange(1, budget + 1) * light[-1]) // (budget + 1) + 1)
    return values[np.union1d(own, picked[picked < last])]


def binned(X: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """The bin of every value: bin <= t exactly when x <= edges[t]."""
    out = np.empty(X.shape, dtype=np.uint8)
    for f, e in enumerate(edges):
        out[:, f] = np.searchsorted(e, X[:, f], side="left")
    return out


def grow_trees(trees: range) -> list[dict]:
    """Trees of the forest in _WORK, grown together a level at a time (see RandomForest):
    each one's node arrays, feature importances and out-of-bag rows. A split is kept as the
    bins on either side of the gap it cuts (low, the left side's highest; high, the right
    side's lowest). Tree t draws its bootstrap sample and its nodes' features from its own
    generator, seeded (seed, t)."""
    bins, label, weight, C, m, min_leaf, max_depth = (
        _WORK[k] for k in ("bins", "label", "weight", "classes", "m", "min_leaf", "max_depth"))
    n, d = bins.shape
    G = len(trees)
    rngs = [np.random.default_rng([_WORK["seed"], t]) for t in trees]
    drawn = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for rng in rngs])
    tree, rows = np.nonzero(drawn)  # the rows of the level's nodes, node after node
    w, y = drawn[tree, rows] * weight[rows], label[rows]
    sizes = np.bincount(tree, minlength=G)  # rows per node of the level
    owner = np.arange(G)  # the tree of each node of the level
    before = np.zeros(G, np.int64)  # nodes of each tree in the levels before
    levels, importance, depth = [], np.zeros((G, d)), 0
    while len(sizes):
        K = len(sizes)
        node = np.repeat(np.arange(K), sizes)
        totals = np.bincount(node * C + y, weights=w, minlength=K * C).reshape(K, C)
        feature, left = np.full(K, -1, np.int32), np.full(K, -1, np.int64)
        low, high = np.zeros(K, np.uint8), np.zeros(K, np.uint8)
        open_ = (sizes >= max(2, 2 * min_leaf)) & ((totals > 0).sum(1) > 1) & (depth < max_depth)
        next_sizes, next_owner = np.zeros(0, np.int64), np.zeros(0, np.int64)
        first_child = before + np.bincount(owner, minlength=G)  # where each tree's next level starts
        if open_.any():
            keep = open_[node]
            rows, w, y = rows[keep], w[keep], y[keep]
            opened = np.flatnonzero(open_)
            tried = np.concatenate([rngs[g].random((k, d)).argpartition(m - 1, axis=1)[:, :m] if m < d
                                    else np.tile(np.arange(d), (k, 1))
                                    for g, k in enumerate(np.bincount(owner[opened], minlength=G))])
            found = best_splits(bins, rows, w, y, sizes[open_], totals[open_], tried, min_leaf)
            if m < d:
                found = past_constants(bins, rows, w, y, sizes[open_], totals[open_], tried, owner[opened], rngs,
                                       min_leaf, found)
            nodes, f, b, above, decrease = found
            split = opened[nodes]  # the level's nodes that split, tree by tree
            np.add.at(importance, (owner[split], f), decrease)
            feature[split], low[split], high[split] = f, b, above
            in_tree = np.arange(len(split)) - np.searchsorted(owner[split], owner[split])  # rank within its tree
            left[split] = first_child[owner[split]] + 2 * in_tree
            # the rows of the nodes that split, into their children: left ones first
            splits = np.zeros(len(opened), bool)
            splits[nodes] = True
            node = np.repeat(np.arange(len(opened)), sizes[open_])
            keep = splits[node]
            rows, w, y, node = rows[keep], w[keep], y[keep], node[keep]
            node_feature, node_bin = np.zeros(len(opened), np.intp), np.zeros(len(opened), np.uint8)
            node_feature[nodes], node_bin[nodes] = f, b
            child = 2 * (np.cumsum(splits) - 1)[node] + (bins[rows, node_feature[node]] > node_bin[node])
            order = np.argsort(child, kind="stable")  # stable: rows stay in memory order within a node
            rows, w, y = rows[order], w[order], y[order]
            next_sizes, next_owner = np.bincount(child, minlength=2 * len(nodes)), np.repeat(owner[split], 2)
        value = (totals / totals.sum(1, keepdims=True)).astype(np.float32)
        levels.append((owner, feature, low, high, left, value))
        sizes, owner, before, depth = next_sizes, next_owner, first_child, depth + 1
    owner, *arrays = (np.concatenate(parts) for parts in zip(*levels))
    order = np.argsort(owner, kind="stable")  # tree after tree, each in level order
    owner, (feature, low, high, left, value) = owner[order], (a[order] for a in arrays)
    start = np.searchsorted(owner, np.arange(G + 1))
    out = []
    for g in range(G):
        nodes, total = slice(start[g], start[g + 1]), importance[g].sum()
        out.append(dict(feature=feature[nodes], low=low[nodes], high=high[nodes], left=left[nodes],
                        right=np.where(left[nodes] >= 0, left[nodes] + 1, -1), value=value[nodes],
                        importance=importance[g] / total if total > 0 else importance[g],
                        oob=np.flatnonzero(drawn[g] == 0)))
    return out


def past_constants(bins, rows, w, y, sizes, totals, tried, trees, rngs, min_leaf, found):
    """scikit-learn's rule for a node whose tried features are all constant in it: it draws
    on, one feature at a time, until one varies, and tries that one too. Such a node is a
    leaf only if no feature varies in it. `found` is what best_splits found with the first
    draw (arguments alike; trees: each node's tree, rngs: the trees' generators); the
    result adds the splits of those nodes, all in node order."""
    unsplit = np.ones(len(sizes), bool)
    unsplit[found[0]] = False
    node = np.repeat(np.arange(len(sizes)), sizes)
    mine = unsplit[node]
    if not mine.any():
        return found
    idx = np.flatnonzero(unsplit)
    values = bins[rows[mine]]  # every feature of the unsplit nodes' rows, node after node
    starts = np.cumsum(sizes[idx]) - sizes[idx]
    varies = np.minimum.reduceat(values, starts) != np.maximum.reduceat(values, starts)  # (unsplit nodes, d)
    stuck = varies.any(1) & ~np.take_along_axis(varies, tried[idx], 1).any(1)
    if not stuck.any():
        return found
    again = idx[stuck]
    # a feature drawn at random among those that vary, tree by tree from each tree's generator
    keys = np.concatenate([rngs[g].random((k, bins.shape[1]))
                           for g, k in enumerate(np.bincount(trees[again], minlength=len(rngs)))])
    pick = np.where(varies[stuck], keys, np.inf).argmin(1)
    keep = np.isin(node, again)
    extra = best_splits(bins, rows[keep], w[keep], y[keep], sizes[again], totals[again], pick[:, None], min_leaf)
    merged = [np.concatenate([a, e]) for a, e in zip(found, (again[extra[0]],) + extra[1:])]
    order = np.argsort(merged[0], kind="stable")
    return tuple(a[order] for a in merged)


def best_splits(bins, rows, w, y, sizes, totals, tried, min_leaf):
    """The best gini split of each node of a level among its tried features (nodes x m).
    rows lists node 0's rows, then node 1's, ...; w and y are their weights and classes;
    sizes and totals (class weights) are per node. Returns the nodes that can split, and
    for each its feature, the bins either side of the cut (left: bin <= low, right: bin >=
    high, none between) and weighted impurity decrease."""
    node = np.repeat(np.arange(len(sizes)), sizes)
    values = bins[rows[:, None], tried[node]]  # (rows, m): the bins of each row's tried features
    large = len(rows) >= 256 * len(sizes)  # nodes so large that histograms cost less than sorting
    return (best_splits_dense if large else best_splits_sorted)(values, node, sizes, w, y, totals, tried, min_leaf)


def best_splits_sorted(values, node, sizes, w, y, totals, tried, min_leaf):
    """best_splits by sorting (node, feature, bin, row) keys: see RandomForest."""
    K, C = totals.shape
    m = tried.shape[1]
    segment = (node[:, None] * m + np.arange(m)).astype(np.uint64)  # (node, candidate feature)
    width = len(values).bit_length()  # bits of a row's position; the bin takes 8 above them, the segment the rest
    assert K * m < 1 << (56 - width), "too many rows and nodes for 64-bit keys"
    key = (segment << (width + 8) | values.astype(np.uint64) << width
           | np.arange(len(values), dtype=np.uint64)[:, None]).ravel()
    key.sort()
    position = (key & ((1 << width) - 1)).astype(np.intp)
    bin_ = (key >> width).astype(np.uint8)  # the low byte: the bin
    seg_len = np.repeat(sizes, m)
    seg_start = np.cumsum(seg_len) - seg_len
    # a split after sorted entry i: the next entry has a larger bin in the same segment
    cut = np.flatnonzero(bin_[:-1] != bin_[1:])
    seg = (key[cut] >> (width + 8)).astype(np.intp)
    n_left = cut + 1 - seg_start[seg]
    ok = (n_left >= min_leaf) & (seg_len[seg] - n_left >= min_leaf)
    cut, seg = cut[ok], seg[ok]
    if not len(cut):
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros(0)
    w_sorted, y_sorted = w[position], y[position]
    start, end, cum = seg_start[seg], cut + 1, np.zeros(len(key) + 1)
    left = np.empty((C, len(cut)))  # class weights left of each cut: all of them in row 0, until the others are known
    np.cumsum(w_sorted, out=cum[1:])
    left[0] = cum[end] - cum[start]
    for c in range(1, C):
        np.cumsum(np.where(y_sorted == c, w_sorted, 0.0), out=cum[1:])
        left[c] = cum[end] - cum[start]
        left[0] -= left[c]
    owner = seg // m
    right = totals.T[:, owner] - left
    # maximising sum(L^2)/|L| + sum(R^2)/|R| minimises the children's weighted gini
    score = (left * left).sum(0) / left.sum(0) + (right * right).sum(0) / right.sum(0)
    first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    best = np.repeat(np.maximum.reduceat(score, first), np.diff(np.r_[first, len(score)]))
    top = np.flatnonzero(score >= best)
    top = top[np.r_[True, owner[top][1:] != owner[top][:-1]]]  # each node's first best
    nodes, parent = owner[top], totals[owner[top]]
    decrease = score[top] - (parent * parent).sum(1) / parent.sum(1)  # w·gini - wl·gini_l - wr·gini_r
    return nodes, tried[nodes, seg[top] % m], bin_[cut[top]], bin_[cut[top] + 1], decrease


def best_splits_dense(values, node, sizes, w, y, totals, tried, min_leaf):
    """best_splits from class-weight histograms over (node, feature, bin), for levels of
    nodes so large that their bins are mostly full. The same splits, ties broken alike."""
    K, C = totals.shape
    m = tried.shape[1]
    cell = ((node[:, None] * m + np.arange(m)) * 256 + values).ravel()  # (node, feature, bin)
    hist = np.bincount(cell * C + np.repeat(y, m), weights=np.repeat(w, m), minlength=K * m * 256 * C)
    left = np.ascontiguousarray(hist.reshape(K * m, 256, C).transpose(2, 0, 1)).cumsum(2)
    right = left[:, :, -1:] - left
    left, right = left[:, :, :-1], right[:, :, :-1]  # a split after bin t = 0..254
    weight_left, weight_right = left.sum(0), right.sum(0)  # (K * m, 255)
    ok = (weight_left > 0) & (weight_right > 0)
    if min_leaf > 1:
        n_left = np.bincount(cell, minlength=K * m * 256).reshape(K * m, 256).cumsum(1)
        ok &= (n_left[:, :-1] >= min_leaf) & (n_left[:, -1:] - n_left[:, :-1] >= min_leaf)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (left * left).sum(0) / weight_left + (right * right).sum(0) / weight_right
    score = np.where(ok, score, -np.inf).reshape(K, m * 255)
    best = score.argmax(1)  # the first best: lowest feature, then lowest bin
    nodes = np.flatnonzero(np.isfinite(score[np.arange(K), best]))
    j, t = np.divmod(best[nodes], 255)
    occupied = np.diff(weight_left, axis=1, prepend=0, append=np.inf)[nodes * m + j] > 0  # bins holding rows
    above = np.argmax(occupied * (np.arange(256) > t[:, None]), axis=1)  # the first such bin after t
    parent = totals[nodes]
    decrease = score[nodes, best[nodes]] - (parent * parent).sum(1) / parent.sum(1)
    return nodes, tried[nodes, j], t.astype(np.uint8), above.astype(np.uint8), decrease


def route(X, feature, threshold, left, right, node, row) -> np.ndarray:
    """The leaf that row[i] of X reaches from node[i], for every i."""
    flat, offset = X.ravel(), row * X.shape[1]
    leaf = np.empty_like(node)
    active = np.arange(len(node))
    while len(active):
        f = feature[node]
        done = f < 0
        if done.any():
            leaf[active[done]] = node[done]
            active, node, offset, f = active[~done], node[~done], offset[~done], f[~done]
        node = np.where(flat[offset + f] > threshold[node], right[node], left[node])
    return leaf


# ---------------------------------------------------------------- train

def auc(positive, score) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative, ties counting half (Mann-Whitney U on average ranks)."""
    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average 1-based rank of ties
    return float((rank[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(positive, score, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall and F1 of score >= threshold as the positive class, and AUC."""
    positive, predicted = np.asarray(positive, bool), np.asarray(score) >= threshold
    tp, fp, fn = (positive & predicted).sum(), (~positive & predicted).sum(), (positive & ~predicted).sum()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return dict(accuracy=float((positive == predicted).mean()), precision=float(precision), recall=float(recall),
                f1=float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0,
                auc=auc(positive, score))


def read_scores(path: Path) -> tuple[dict[str, int], dict[str, str | None]]:
    """id -> score from annotate's output: each document's last line with a score; and id ->
    the text_digest of its text (None for a line without one). An id whose lines hold two
    texts (an older annotate asked for each document of a repeated id) is left out, with a
    warning: embed takes one of the texts, the score may be the other's. A score that is not
    a number from 0 to 10 (a string, NaN, 1e30) is refused, as a line that is not a JSON
    object is: annotate writes none, and it would label silently."""
    if not path.is_file():
        raise UserError(f"no annotations at {path} (filter.py annotate writes them)")
    scores, texts, mixed, malformed, where = {}, {}, set(), [], path.resolve()
    for number, r in read_jsonl(path, numbered=True):
        text = r.get("text")
        doc_id, digest = document_id(r, where, number), text_digest(text) if isinstance(text, str) else None
        if texts.setdefault(doc_id, digest) != digest:  # (doc_id as embed names it)
            mixed.add(doc_id)
        score = r.get("score")
        if score is None:  # a failure or a refusal: no score
            continue
        if not (is_number(score) and 0 <= score <= 10):  # (NaN fails it too)
            malformed.append((number, score))
            continue
        scores[doc_id] = score
    if malformed:
        number, score = malformed[0]
        raise UserError(f"{path} has {counted_lines([n for n, _ in malformed], 'malformed')}: a score is a number "
                        f"from 0 to 10, or null for none, not {json.dumps(score)[:40]} (line {number})")
    if mixed:
        print(f"warning: {len(mixed)} ids of {path} name two documents (first: {min(mixed)}): their scores are "
              f"left out; annotate into another --labels to score them", file=sys.stderr)
    return {doc_id: score for doc_id, score in scores.items() if doc_id not in mixed}, texts


def same_texts(rows: list[int], ids: list[str], meta: dict, digests: dict, cfg) -> list[int]:
    """The rows of the embeddings (ids, meta: load_embeddings') whose text is the one scored
    (digests: read_scores'; a label without a text is taken on trust). Annotate and embed
    know a document by its id, and a corpus made again (prepare.py's dataset:row ids of
    another draw) or edited holds other texts under the same ids: a forest that learned
    their scores for those texts filters by someone else's judgement, the reverse of the
    teacher's at worst. A few such documents (an edited corpus) are left out, with a
    warning; more than MISMATCHED of them say that another corpus was embedded: refused."""
    embedded = meta.get("digests")
    if embedded is None:  # embeddings of a version 1 sidecar
        print(f"note: {cfg.embeddings} was made by an older filter.py, which kept no digests of its texts: train "
              f"cannot check that they are the texts scored; rerun the same filter.py embed to add them",
              file=sys.stderr)
        return rows
    same = [i for i in rows if digests[ids[i]] in (None, embedded[i])]
    other = [ids[i] for i in rows if digests[ids[i]] not in (None, embedded[i])]
    if len(other) > MISMATCHED * len(rows):
        raise UserError(f"{len(other)} of the {len(rows)} documents scored in {cfg.labels} have another text in "
                        f"{cfg.embeddings} under their id (first: {other[0]}): it embeds another corpus than the one "
                        f"annotated, or one made again since; embed the labels' own texts (filter.py embed without "
                        f"--corpus)")
    if other:
        print(f"warning: {len(other)} of the {len(rows)} documents scored in {cfg.labels} have another text in "
              f"{cfg.embeddings} under their id (first: {other[0]}), edited since they were annotated: they are "
              f"left out", file=sys.stderr)
    return same


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held out, used for training): row indices, fraction of each class held out at
    random, so that both sides have both classes wherever the counts allow."""
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(np.flatnonzero(y == kind)) for kind in (False, True)]
    held = np.sort(np.concatenate([rows[:round(fraction * len(rows))] for rows in shuffled]))
    return held, np.setdiff1d(np.arange(len(y)), held)


def positive_column(forest: RandomForest) -> int:
    if True not in forest.classes_.tolist():
        raise UserError(f"the forest's classes are {forest.classes_.tolist()}, not a filter's [False, True]")
    return forest.classes_.tolist().index(True)


def train(cfg) -> RandomForest:
    """Fit the forest on the annotated documents' embeddings, report, save to cfg.forest."""
    if not 0 <= cfg.holdout < 1 or cfg.class_weight not in ("balanced", "none"):
        raise UserError("--holdout must be in [0, 1) and --class_weight balanced or none")
    if not 0 <= cfg.min_score <= 10:
        raise UserError(f"--min_score must be a score, from 0 to 10, not {cfg.min_score}")
    check_apart({"--forest": Path(cfg.forest)}, {"--labels": [Path(cfg.labels)],
                                                  "--embeddings": [Path(cfg.embeddings)]})
    check_writable(Path(cfg.forest))  # before the fit, not after it
    scores, digests = read_scores(Path(cfg.labels))
    ids, array, meta = load_embeddings(Path(cfg.embeddings))
    rows = [i for i, doc_id in enumerate(ids) if doc_id in scores]
    if not rows:
        raise UserError(f"none of the {len(ids)} documents of {cfg.embeddings} has a score in {cfg.labels}")
    if len(rows) < len(scores):
        print(f"note: {len(scores) - len(rows)} of the {len(scores)} documents scored in {cfg.labels} have no "
              f"embedding in {cfg.embeddings}: rerun filter.py embed to train on them too", file=sys.stderr)
    rows = same_texts(rows, ids, meta, digests, cfg)
    X = np.asarray(array[rows], dtype=np.float32)
    if not np.isfinite(X).all():
        raise UserError(f"{cfg.embeddings} holds NaN or infinite values: embed again (with --dtype=float32?)")
    y = np.array([scores[ids[i]] >= cfg.min_score for i in rows])
    if y.all() or not y.any():
        raise UserError(f"all {len(y)} annotated documents are {'positive' if y.all() else 'negative'} at "
                        f"--min_score={cfg.min_score}: a classifier needs both kinds")
    held, used = holdout_split(y, cfg.holdout, cfg.seed)
    if len(held) and not (np.unique(y[held]).size == np.unique(y[used]).size == 2):
        print(f"note: holding out {cfg.holdout:g} of {len(y)} documents ({int(y.sum())} positive) leaves one side "
              f"without both classes: training on all of them, with no held-out metrics", file=sys.stderr)
        held, used = held[:0], np.arange(len(y))
    features = cfg.max_features
    if re.fullmatch(r"\d+", features):
        features = int(features)
    elif re.fullmatch(r"\d*\.\d+", features):
        features = float(features)
    try:
        forest = RandomForest(n_trees=cfg.n_trees, max_depth=cfg.max_depth or None, max_features=features,
                              min_samples_leaf=cfg.min_samples_leaf, seed=cfg.seed, n_jobs=cfg.workers or -1,
                              class_weight=None if cfg.class_weight == "none" else "balanced", progress=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"training on {len(used)} of {len(y)} annotated documents ({int(y.sum())} positive: score >= "
          f"{cfg.min_score}), {len(held)} held out; {X.shape[1]} features")
    started = time.time()
    forest.fit(X[used], y[used])
    # no time in the file: the same fit writes the same bytes, which apply takes for the same forest
    report = dict(documents=len(y), positives=int(y.sum()), trained_on=len(used), held_out=len(held),
                  oob_accuracy=forest.oob_score_)
    print(f"fit in {time.time() - started:.1f} s; out-of-bag accuracy {forest.oob_score_:.4f}")
    if len(held):
        proba = forest.predict_proba(X[held])[:, positive_column(forest)]
        report["held_out"] = metrics(y[held], proba)
        print("held out: " + ", ".join(f"{k} {v:.4f}" for k, v in report["held_out"].items()))
    forest.info = dict(embedding=meta["source"], min_score=cfg.min_score, labels=cfg.labels, report=report)
    try:
        forest.save(cfg.forest)
    except OSError as e:  # a full disk, after the fit
        raise cannot_write(Path(cfg.forest), e) from None
    print(f"forest: {cfg.forest}")
    return forest


# ---------------------------------------------------------------- apply

def histogram(scores: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents and tokens per score bin [b / bins, (b + 1) / bins) (1.0 in the last),
    read a million scores at a time. A float32 score times bins is exact in float64, so a
    score is in bin b or above exactly when score >= b / bins in Python floats, as apply
    compares them (in float32 the product rounds: 0.40969998 would fall in bin 4097 of
    10,000 but not be kept at 0.4097)."""
    documents, tokens = np.zeros(bins, np.int64), np.zeros(bins)
    for start in range(0, len(scores), 1 << 20):
        part = scores[start:start + (1 << 20)]
        b = np.minimum((part["score"].astype(np.float64) * bins).astype(np.int64), bins - 1)
        documents += np.bincount(b, minlength=bins)
        tokens += np.bincount(b, weights=part["tokens"], minlength=bins)
    return documents, tokens


def top_threshold(scores: np.ndarray, fraction: float, bins: int = 10_000) -> float:
    """The highest bin edge t such that the documents scoring at least t hold at least
    fraction of the tokens (a bin's worth more at most)."""
    from_top = np.cumsum(histogram(scores, bins)[1][::-1])[::-1]  # tokens scoring at least b / bins
    return float(np.flatnonzero(from_top >= fraction * from_top[0])[-1] / bins) if len(scores) else 0.0


def score_shard(cfg, files, shard: int, shards: int, forest: RandomForest, model, doc_tokens: int, path: Path,
                rank: int, world: int) -> tuple[int, Counter]:
    """Embed and score this process's chunks of the shard (of CHUNK documents, every world-th
    from the rank-th) not scored before into their places in path's .partial, which process 0
    made (SCORES records), flagging each as it is done; returns the documents of the whole
    shard, and its lines without one, by why."""
    column, documents_seen, skipped = positive_column(forest), 0, Counter()
    partial, _, flags_path = progress_paths(path)
    done = flags_path.read_bytes()  # chunk c was scored before iff done[c] is 1
    if rank == 0 and done.count(1):
        print(f"resuming: {done.count(1)} chunks of {path.name} scored before")
    try:
        with open(partial, "r+b") as f, open(flags_path, "r+b") as flags, \
                tqdm(desc=f"scoring {path.name}{f' (rank {rank})' if world > 1 else ''}", unit=" docs") as bar:
            for c, texts in enumerate(batched((text for _, _, text, _ in documents(files, skipped, shard, shards)),
                                              CHUNK)):
                documents_seen += len(texts)
                if c % world != rank or done[c:c + 1] == b"\x01":
                    continue
                X, tokens = embed_texts(model, texts, doc_tokens, cfg.batch_size)
                X = X.astype(np.float16)  # rounded as embed stores them
                broken = int((~np.isfinite(X)).any(1).sum())
                if broken:  # the forest cannot score them: a model that overflows, or NaN weights' garbage
                    raise UserError(f"shard {shard} of {shards}: {broken} of its documents {c * CHUNK} to "
                                    f"{documents_seen - 1} embed to NaN or infinite values (--dtype={cfg.dtype}): "
                                    f"try --dtype=float32")
                records = np.zeros(len(texts), SCORES)
                records["score"] = forest.predict_proba(X)[:, column]
                records["tokens"] = np.minimum(tokens, np.iinfo(np.uint32).max)
                f.seek(c * CHUNK * SCORES.itemsize)
                f.write(records.tobytes())
                f.flush()
                os.fsync(f.fileno())  # on disk before its flag: after a crash of the machine, no flag
                # may stand for scores lost with the page cache (embed's memmap flush is an msync)
                flags.seek(c)
                flags.write(b"\x01")
                flags.flush()
                bar.update(len(texts))
    except OSError as e:  # a full disk (what is written stays, as an interrupted run leaves it)
        raise cannot_write(path, e) from None
    return documents_seen, skipped


def scores_description(path: Path) -> Path:
    """scores-I-of-N.json beside scores-I-of-N.bin: what made the scores, and how many there are."""
    return path.with_suffix(".json")


def scores_done(path: Path, scoring: str) -> bool:
    """Whether path holds the whole shard's scores of fingerprint scoring, as its description says."""
    try:
        meta = json.loads(scores_description(path).read_text())
        return meta["scoring"] == scoring and path.stat().st_size == SCORES.itemsize * meta["documents"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def shard_done(summary: dict, scoring: str, selection: dict, kept_path: Path) -> bool:
    """Whether the shard's summary says it is done as asked: of these scores, with this
    selection, and naming the kept file it goes with (one replaced by a run killed before its
    summary is not done)."""
    return (summary.get("scoring") == scoring and summary.get("selection") == selection and kept_path.is_file()
            and summary.get("kept") == files_identity([kept_path]))


def apply(cfg) -> dict | None:
    """Score shard cfg.shard of cfg.corpus and write its kept documents and summary (see the module
    doc); returns the summary on process 0, while the others of torchrun's only help score."""
    from model import pick_device
    from train import together
    with alike_on_every_process():  # the command line's mistakes, said once under torchrun
        files = corpus_files(cfg.corpus)
        if cfg.num_shards < 1 or not 0 <= cfg.shard < cfg.num_shards:
            raise UserError(f"--num_shards must be at least 1 and --shard in [0, --num_shards), not {cfg.shard} "
                            f"of {cfg.num_shards}")
        if not 0 <= cfg.threshold <= 1 or not 0 <= cfg.top_fraction <= 1:
            raise UserError("--threshold and --top_fraction must be in [0, 1]")
        if cfg.batch_size < 1:
            raise UserError("--batch_size must be at least 1")
        try:
            forest = RandomForest.load(cfg.forest)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        positive_column(forest)
        source = forest.info.get("embedding", {})
        ckpt, doc_tokens = cfg.ckpt or source.get("ckpt"), source.get("doc_tokens", cfg.doc_tokens)
        if cfg.doc_tokens not in (doc_tokens, DEFAULTS["doc_tokens"]) and first_process():
            print(f"note: --doc_tokens={cfg.doc_tokens} is not used: the forest learned from embeddings of the "
                  f"first {doc_tokens} tokens, so apply embeds those", file=sys.stderr)
        if not ckpt:
            raise UserError("--ckpt is needed: the forest does not say which model made its embeddings")
        # the shard is the same lines however many processes share its work
        shard, shards = cfg.shard, cfg.num_shards
        out = Path(cfg.out or "out/filtered")
        name = f"{shard:05d}-of-{shards:05d}"
        kept_path, scores_path, summary_path = (out / f"{kind}-{name}{ext}" for kind, ext in
                                                (("kept", ".jsonl"), ("scores", ".bin"), ("summary", ".json")))
        # another shard's output read as corpus: each run would filter the last one's kept documents again
        # (said before check_apart would name the file, not the folder that --out names)
        ours = [p for p in files if APPLY_OUTPUT.fullmatch(p.name) and same_file(p.parent, out)]
        if ours:
            raise UserError(f"--corpus takes {ours[0]}, which apply writes in --out={out}: each run would read the "
                            f"last one's output as corpus; give --out a folder outside the corpus")
        for path in (kept_path, scores_path, scores_description(scores_path), summary_path):
            check_apart({"--out": path}, {"--corpus": files, "--forest": [Path(cfg.forest)]})
        check_writable(kept_path)
        dtype = embedding_dtype(cfg, pick_device(cfg.device))  # (a bad --device or --dtype)
    rank, world, device = start_processes(cfg)  # every process joins, before any may find the shard done
    stale = sorted(p.name for p in out.glob("kept-*-of-*.jsonl") if not p.name.endswith(f"-of-{shards:05d}.jsonl"))
    if stale and rank == 0:
        print(f"warning: {out} holds kept files of another --num_shards ({', '.join(stale[:3])}"
              f"{f' and {len(stale) - 3} more' if len(stale) > 3 else ''}): a glob of its kept-*.jsonl, as "
              f"prepare.py --inputs takes, would take them too, and their documents twice; keep each "
              f"--num_shards in an --out of its own (move those files to another folder)", file=sys.stderr)
    if source.get("dtype") not in (None, dtype) and rank == 0:  # (forests of before embed kept no dtype)
        print(f"note: the forest learned from embeddings made in {source['dtype']}, and these are made in {dtype}: "
              f"--dtype={source['dtype']} makes them alike", file=sys.stderr)
    identity = content_identity(ckpt)
    learned = source.get("model")  # (forests of before it kept no model's contents)
    if learned is not None and model_contents(learned) != model_contents(identity) and rank == 0:
        print(f"note: {ckpt} holds other weights than those the forest learned from ({learned[0]} as embed "
              f"found it): its scores of these embeddings may mean little; embed and train again with this model, "
              f"or give --ckpt that one", file=sys.stderr)
    scoring = fingerprint(files_identity(files), content_identity(cfg.forest), identity, doc_tokens, dtype, shard,
                          shards)
    selection = dict(threshold=cfg.threshold, top_fraction=cfg.top_fraction)
    with contextlib.ExitStack() as held:  # process 0's lock on the shard, held to the end
        with together(world, device):  # (and a barrier: every process reads the shard's files under the lock)
            if rank == 0:
                make_folder(kept_path)
                # one run at a time on a shard: two would score it into one file at once
                held.enter_context(run_lock(out / f"{name}.lock", f"another run is filtering shard {name} in "
                                                                  f"{out}: wait for it, stop it, or use another --out",
                                            remove=True))
        previous = json_object(summary_path)
        if shard_done(previous, scoring, selection, kept_path):
            if rank == 0:
                print(f"shard {name} is done: {summary_path}")
            return previous
        started = time.time()
        # scores described as whole are used again, whatever a run killed after them left undone
        if not scores_done(scores_path, scoring):
            with together(world, device):  # (and a barrier: every process sees the files process 0 made)
                model = load_embedder(cfg, ckpt, device)
                if model.config.n_embd != forest.n_features_:
                    raise UserError(f"{ckpt} embeds in {model.config.n_embd} dimensions, "
                                    f"the forest takes {forest.n_features_}")
                # only now: a model that does not load leaves --out as it was
                if rank == 0:  # the scores replaced, and what was selected from them: a run killed before its
                    # end must leave no kept file of another forest, corpus or model for a reader to take (as embed)
                    for stale in (summary_path, scores_description(scores_path), kept_path, scores_path):
                        stale.unlink(missing_ok=True)
                    partial, progress, flags = progress_paths(scores_path)
                    work = dict(scoring=scoring, chunk=CHUNK)
                    if not (json_object(progress) == work and partial.is_file() and flags.is_file()):
                        try:  # (else a rerun goes on from the chunks scored) the processes score into it
                            partial.write_bytes(b"")
                            flags.write_bytes(b"")
                            write_atomic(progress, json.dumps(work).encode())
                        except OSError as e:
                            raise cannot_write(scores_path, e) from None
            with each_its_share(world, device):
                documents_seen, skipped = score_shard(cfg, files, shard, shards, forest, model, doc_tokens,
                                                      scores_path, rank, world)
            if rank == 0:
                warn_skipped(skipped, files)
                # lines, none of them a document: a wrong corpus, unless other shards hold documents (this
                # one's lines were blank), or this shard is past a small corpus's end (no lines at all)
                partial, progress, flags = progress_paths(scores_path)
                if not documents_seen and skipped and next(documents(files, Counter()), None) is None:
                    for leftover in (partial, progress, flags):
                        leftover.unlink()
                    raise UserError(f"no documents in {', '.join(map(str, files))}")
                # saying the file holds the scores of fingerprint scoring, whole (until then a rerun scores on):
                # before the rename, as embed's description, so that a kill between leaves the chunks scored
                write_atomic(scores_description(scores_path),
                             json.dumps(dict(scoring=scoring, documents=documents_seen)).encode())
                os.replace(partial, scores_path)
                progress.unlink()
                flags.unlink()
        if rank != 0:  # the others only helped score
            return None
        scores = np.memmap(scores_path, dtype=SCORES, mode="r") if scores_path.stat().st_size else np.zeros(0, SCORES)
        threshold = top_threshold(scores, cfg.top_fraction) if cfg.top_fraction else cfg.threshold

        # the scores' description keeps them usable: a selection killed at any point selects
        # again from them, and never re-embeds the shard
        partial = partial_path(kept_path)
        kept = kept_tokens = seen = 0
        lowest, tied, tied_tokens = math.inf, 0, 0  # the lowest score kept, and the documents and tokens at it
        try:
            with open(partial, "w", encoding="utf-8") as f:
                for i, (_, _, _, record) in enumerate(documents(files, Counter(), shard, shards)):
                    seen += 1
                    # in Python floats, as histogram bins them: numpy would compare a float32 in float32
                    if i < len(scores) and float(scores[i]["score"]) >= threshold:
                        score, tokens = float(scores[i]["score"]), int(scores[i]["tokens"])
                        f.write(json.dumps({**record, "score": round(score, 6)}, ensure_ascii=False) + "\n")
                        kept, kept_tokens = kept + 1, kept_tokens + tokens
                        if score < lowest:
                            lowest, tied, tied_tokens = score, 0, 0
                        if score == lowest:
                            tied, tied_tokens = tied + 1, tied_tokens + tokens
        except OSError as e:  # a full disk: the scores stay, and a rerun selects again from them
            raise cannot_write(kept_path, e) from None
        if seen != len(scores):
            partial.unlink()
            raise UserError(f"{cfg.corpus} changed while shard {name} was filtered: rerun")
        os.replace(partial, kept_path)
        counts, tokens = histogram(scores, 10)
        summary = dict(shard=shard, num_shards=shards, documents=len(scores), tokens=int(tokens.sum()),
                       kept_documents=kept, kept_tokens=kept_tokens, threshold=threshold, selection=selection,
                       histogram={f"{b / 10:.1f}-{(b + 1) / 10:.1f}":
                                  dict(documents=int(counts[b]), tokens=int(tokens[b])) for b in range(10)},
                       forest=cfg.forest, ckpt=ckpt, doc_tokens=doc_tokens, dtype=dtype, scoring=scoring,
                       kept=files_identity([kept_path]),
                       seconds=round(time.time() - started, 1))
        write_atomic(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
        print(f"shard {name}: kept {kept} of {len(scores)} documents, {kept_tokens:,} of {summary['tokens']:,} tokens "
              f"({kept_tokens / max(1, summary['tokens']):.1%}) at score >= {threshold:.4f}; {kept_path}")
        asked = cfg.top_fraction * summary["tokens"]
        if cfg.top_fraction and tied > 1 and kept_tokens - tied_tokens < asked and kept_tokens > 1.1 * asked:
            print(f"note: --top_fraction={cfg.top_fraction:g} kept {kept_tokens / summary['tokens']:.1%} of the "
                  f"tokens: {tied} documents ({tied_tokens:,} tokens) score {lowest:.6f} exactly, at the cut, and "
                  f"ties at it are kept", file=sys.stderr)
        return summary


# ---------------------------------------------------------------- decontaminate

_FOLDED = (ast.expr_context, ast.operator, ast.unaryop, ast.boolop, ast.cmpop)  # become part of their parent's label
_LABELS: dict[str, int] = {}  # node label -> a small int


def _label(node: ast.AST) -> int:
    name = type(node).__name__
    if isinstance(node, (ast.BinOp, ast.AugAssign, ast.UnaryOp, ast.BoolOp)):
        name += ":" + type(node.op).__name__
    elif isinstance(node, ast.Compare):
        name += ":" + ",".join(type(op).__name__ for op in node.ops)
    elif isinstance(node, ast.Constant):
        name += ":" + type(node.value).__name__
    return _LABELS.setdefault(name, len(_LABELS))


def _children(node: ast.AST) -> list[ast.AST]:
    kids = [c for c in ast.iter_child_nodes(node) if not isinstance(c, _FOLDED)]
    body = getattr(node, "body", None)
    if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
            and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        kids.remove(body[0])  # the docstring
    return kids


def parse(source: str) -> ast.Module | None:
    """source's AST, or None where it is not Python (of this version) or nests too deep to parse."""
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def code_tree(source: str):
    """The tree_of source's AST, or None if it does not parse."""
    root = parse(source)
    return None if root is None else tree_of(root)


def tree_of(root: ast.AST, walked: dict | None = None):
    """The AST under root for the tree edit distance: node labels in postorder (type only,
    see the module doc), the leftmost leaf of each node, and Zhang and Shasha's keyroots.
    walked: the postorder of nodes under root walked before (by id), taken as it is."""
    labels, leftmost = postorder(root, walked or {})
    keyroots = sorted({l: i for i, l in enumerate(leftmost)}.values())  # the highest node of each leftmost leaf
    return labels, leftmost, keyroots


def postorder(root: ast.AST, walked: dict) -> tuple[list[int], list[int]]:
    """The labels of the nodes under root in postorder, and the leftmost leaf of each (of
    a node in walked, its subtree's as found there)."""
    labels, leftmost = [], []
    stack = [[root, iter(_children(root)), None]]  # node, children to visit, its leftmost leaf
    while stack:
        top = stack[-1]
        child = next(top[1], None)
        if child is not None and id(child) in walked:
            start, (child_labels, child_leftmost) = len(labels), walked[id(child)]
            labels += child_labels
            leftmost += [start + i for i in child_leftmost]
            if top[2] is None:
                top[2] = start
            continue
        if child is not None:
            stack.append([child, iter(_children(child)), None])
            continue
        stack.pop()
        labels.append(_label(top[0]))
        leftmost.append(len(labels) - 1 if top[2] is None else top[2])
        if stack and stack[-1][2] is None:
            stack[-1][2] = leftmost[-1]
    return labels, leftmost


def tree_distance(a, b) -> int:
    """Zhang and Shasha's ordered tree edit distance between two code_trees, each insert,
    delete and relabel costing 1."""
    la, lma, kra = a
    lb, lmb, krb = b
    if la == lb and lma == lmb:
        return 0
    td = [[0] * len(lb) for _ in la]  # td[i][j]: distance between the subtrees rooted at i and j
    for i in kra:
        li = lma[i]
        for j in krb:
            lj = lmb[j]
            cols = j - lj + 2
            fd = [list(range(cols))] + [[x] + [0] * (cols - 1) for x in range(1, i - li + 2)]  # forest distances
            for x in range(1, i - li + 2):
                ix = li + x - 1
                lx, label, row, up, tdx = lma[ix], la[ix], fd[x], fd[x - 1], td[ix]
                for y in range(1, cols):
                    jy = lj + y - 1
                    ly = lmb[jy]
                    if lx == li and ly == lj:  # two whole trees
                        v = min(up[y] + 1, row[y - 1] + 1, up[y - 1] + (label != lb[jy]))
                        row[y] = tdx[jy] = v
                    else:
                        row[y] = min(up[y] + 1, row[y - 1] + 1, fd[lx - li][ly - lj] + tdx[jy])
    return td[-1][-1]


def ast_match_rate(a, b) -> float:
    """tau between two code_trees: 1 - tree edit distance / the larger tree's size."""
    return 1.0 - tree_distance(a, b) / max(len(a[0]), len(b[0]))


def ast_match_rate_bound(a, b) -> float:
    """An upper bound on ast_match_rate: a node of the larger tree is deleted, relabelled or
    kept as one with its label, so d >= max(n1, n2) - (labels the trees share as multisets)."""
    shared = sum((Counter(a[0]) & Counter(b[0])).values())
    return shared / max(len(a[0]), len(b[0]))


_FENCE = re.compile(r"^[ \t]*```[^\n`]*\n(.*?)^[ \t]*```", re.M | re.S)  # a markdown code block
_DEFINITION = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_TOP_LEVEL = re.compile(r"^(?:@[^\n]*\n)*(?:def|async[ \t]+def|class)\b", re.M)  # a top-level def, decorators too


def code_units(text: str, max_nodes: float = float("inf")) -> list:
    """The code_trees a document is compared by (none where no Python in it parses): the
    document if it parses as a whole, else each fenced code block (a textbook's), else each
    top-level definition's lines (from one def, class or decorator at the line's start to the
    next) that parse, so one Python 2 line costs a file only the part that holds it; and of
    each, every top-level function and class with the imports it uses, alone and with the
    top-level definitions it uses (helpers), as a benchmark problem is one: a copy inside a
    larger file is compared as itself, where the whole file's tau would be diluted by the
    rest (it divides by the larger tree). A definition with helpers of more than max_nodes
    nodes in all is left out: along a chain of calls (f calls g calls h ...) they would
    make the work quadratic in the file's length, and a unit that much larger than every
    problem cannot reach the tau asked for."""
    whole = parse(text)
    if whole is not None:
        modules = [whole]
    elif _FENCE.search(text):
        modules = []
        for block in map(textwrap.dedent, _FENCE.findall(text)):
            module = parse(block)
            modules += [module] if module is not None else parts_that_parse(block)
    else:
        modules = parts_that_parse(text)
    statements = [s for m in modules for s in m.body]
    used = [names(s) for s in statements]
    # of a name defined twice, the last: the one a call finds
    defined = {s.name: i for i, s in enumerate(statements) if isinstance(s, _DEFINITION)}
    # each statement walked once: the units hold the same ones, a definition in several of them
    walked = {id(s): postorder(s, {}) for s in statements}
    sizes = {i: len(walked[id(s)][0]) for i, s in enumerate(statements) if isinstance(s, _DEFINITION)}
    imports = [s for s in statements if isinstance(s, (ast.Import, ast.ImportFrom))]
    roots = list(modules)
    for i, statement in enumerate(statements):
        if isinstance(statement, _DEFINITION):
            # alone, and with its helpers: a name it uses may be one the problem does not hold, or no call at all
            roots.append(unit({i}, statements, used, imports))
            helped = helpers(i, defined, used, sizes, max_nodes)
            if helped is not None and len(helped) > 1:
                roots.append(unit(helped, statements, used, imports))
    units = {}
    for root in roots:
        tree = tree_of(root, walked)
        units.setdefault((tuple(tree[0]), tuple(tree[1])), tree)  # a module of one function is that function
    return list(units.values())


def helpers(i: int, defined: dict, used: list, sizes: dict, max_nodes: float) -> set[int] | None:
    """Statement i with the top-level definitions (defined: name -> statement) it uses, and
    those use, ...: a problem's solution holds its helpers too (HumanEval/10's make_palindrome
    calls its is_palindrome). None once their sizes (in nodes) add up to more than max_nodes."""
    taken, todo, total = {i}, [i], sizes[i]
    while todo:
        for name in used[todo.pop()]:
            j = defined.get(name)
            if j is not None and j not in taken:
                total += sizes[j]
                if total > max_nodes:
                    return None
                taken.add(j)
                todo.append(j)
    return taken


def unit(taken: set[int], statements: list, used: list, imports: list) -> ast.Module:
    """Statements taken (by index) as a module of their own, in the document's order, as a
    benchmark problem is one, with those of the imports they use (used: each statement's names)."""
    names_used = set().union(*(used[i] for i in taken))
    imported = [s for s in imports if any((a.asname or a.name).split(".")[0] in names_used for a in s.names)]
    return ast.Module(body=imported + [statements[i] for i in sorted(taken)], type_ignores=[])


def parts_that_parse(source: str) -> list[ast.Module]:
    """The top-level definitions of source that parse, each with what precedes it up to the
    one before (a decorator stays with its def)."""
    starts = [m.start() for m in _TOP_LEVEL.finditer(source)]
    if not starts:  # nothing to split: the whole did not parse
        return []
    cuts = [0, *starts, len(source)]
    return [m for m in (parse(source[a:b]) for a, b in zip(cuts, cuts[1:]) if a < b) if m is not None]


def names(node: ast.AST) -> set[str]:
    """The names used in node."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def ngrams(text: str) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i:i + NGRAM])) for i in range(len(words) - NGRAM + 1)}


def compare_document(document: tuple[str, str]):
    """A training document (id, text) against the benchmark problems in _WORK: (its id,
    whether any Python in it parsed, the problems it shares a 13-gram with, [(problem, tau)]
    for those with tau >= min_tau, tau the best over its code_units)."""
    grams, trees, counts, min_tau = _WORK["grams"], _WORK["trees"], _WORK["counts"], _WORK["min_tau"]
    doc_id, text = document
    shared = sorted({p for g in ngrams(text) if g in grams for p in grams[g]})
    problem_sizes, close = counts.sum(1), {}
    units = code_units(text, max_nodes=problem_sizes.max() / min_tau + 1)  # larger: tau < min_tau with every problem
    for tree in units:
        mine = np.bincount(tree[0], minlength=counts.shape[1])[:counts.shape[1]]  # labels new to the problems count 0
        bound = np.minimum(counts, mine).sum(1) / np.maximum(problem_sizes, len(tree[0]))  # against every problem
        for p in np.flatnonzero(bound >= min_tau - 1e-9):
            if bound[p] > close.get(p, 0.0):  # else this unit cannot beat one found already
                tau = ast_match_rate(tree, trees[p])
                if tau >= min_tau - 1e-9 and tau > close.get(p, 0.0):
                    close[p] = tau
    return doc_id, bool(units), shared, sorted((int(p), tau) for p, tau in close.items())


def pass_rates(path: Path, tasks: list[str]) -> dict[str, float]:
    """Each task's pass rate in an evaluate.py results file, read before the comparison (hours
    at the paper's scale) so that a wrong --results is told at once, by file and line."""
    passed, count = Counter(), Counter()
    for record in read_jsonl(path):
        if not ("task_id" in record and isinstance(record.get("passed"), bool)):
            raise UserError(f"--results: {path} holds a record that is not an evaluate.py result (with a task_id "
                            f"and passed: {json.dumps(record)[:80]}): is {path.name} a results.jsonl?")
        passed[str(record["task_id"])] += record["passed"]
        count[str(record["task_id"])] += 1
    if not count:
        raise UserError(f"--results: no results in {path}")
    unknown = set(count) - set(tasks)
    if unknown:
        raise UserError(f"--results: {path} has task ids the benchmarks checked do not: {sorted(unknown)[:3]}")
    return {t: passed[t] / count[t] for t in count}


def result_names(results: list[Path]) -> list[str]:
    """A name for each results file: the fewest trailing parts of its path that tell it from
    the others (evaluate.py writes out/BENCH/results.jsonl, so two models' files differ in a
    folder above), without the file name that they all share."""
    parts = [Path(os.path.abspath(p)).parts for p in results]
    if len({p[-1] for p in parts}) == 1:
        parts = [p[:-1] or p for p in parts]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            break
    return names


def similarity_table(best_tau: dict[str, float], names: list[str], rates: list[dict[str, float]], taus) -> list[dict]:
    """The paper's Table 3: per tau, the problems with a training document at least that
    close (similar) and the others, with the pass rate of each group per results file (by
    its name; None where no problem of the group has a result)."""
    tasks = sorted(set().union(*rates), key=lambda t: (t.split("/")[0], int(t.rpartition("/")[2] or 0)))
    rows = []
    for tau in taus:
        similar = [t for t in tasks if best_tau[t] >= tau]
        other = [t for t in tasks if best_tau[t] < tau]
        for group, members in (("similar", similar), ("non-similar", other), ("total", tasks)):
            rows.append(dict(tau=tau, problems=group, count=len(members), pass_rate={
                name: float(np.mean([r[t] for t in members if t in r])) if any(t in r for t in members) else None
                for name, r in zip(names, rates)}))
    return rows


def table_text(rows: list[dict], names: list[str]) -> str:
    """similarity_table's rows as the paper prints them: aligned columns, a tau on its group's first line."""
    lines = [["tau", "problems", "count", *names]]
    for row in rows:
        cells = ["-" if row["pass_rate"][n] is None else f"{100 * row['pass_rate'][n]:.1f}%" for n in names]
        lines.append([f"{row['tau']:g}" if row["problems"] == "similar" else "", row["problems"], str(row["count"]),
                      *cells])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in lines)


def same_file(a: Path, b: Path) -> bool:
    """Whether a and b name one file, by whatever path (a link, "..", a hard link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is not there (yet): compare where the paths lead
        try:
            return a.resolve() == b.resolve()
        except RuntimeError:  # a symlink loop leads nowhere: it is only itself, by the same path
            return os.path.abspath(a) == os.path.abspath(b)


def check_apart(outputs: dict[str, Path], inputs: dict[str, list[Path]]) -> None:
    """Refuse an output that is one of the inputs or an earlier output: writing it would
    overwrite, without a word, what is read (the corpus itself) or what was just written."""
    taken = [(option, path) for option, paths in inputs.items() for path in paths]
    for option, path in outputs.items():
        for other_option, other in taken:
            if same_file(path, other):
                raise UserError(f"{option}={path} is the file {other_option} names ({other}): "
                                f"writing it would overwrite that; give {option} another path")
        taken.append((option, path))


def decontaminate(cfg) -> dict:
    """Check cfg.corpus against the benchmarks; write the report (and the pruned set).
    The comparison takes hours at the paper's scale, so all that can go wrong with the
    settings (the outputs, --results, --ckpt) is found out before it."""
    import evaluate
    if cfg.prune_tau and not cfg.out:
        raise UserError("--prune_tau needs --out: where to write the pruned documents")
    if cfg.out and not cfg.prune_tau:
        raise UserError("--out needs --prune_tau: the tau at which a document is left out of it")
    if not 0 < cfg.min_tau <= 1 or (cfg.prune_tau and not cfg.min_tau <= cfg.prune_tau <= 1):
        raise UserError("--min_tau must be in (0, 1], and --prune_tau (if given) in [--min_tau, 1]")
    if cfg.ckpt and (cfg.doc_tokens < 1 or cfg.batch_size < 1):
        raise UserError("--doc_tokens and --batch_size must be at least 1")
    benches = list(dict.fromkeys(b.strip() for b in cfg.bench.split(",") if b.strip()))  # each once
    if not benches:
        raise UserError("--bench is needed: humaneval, mbpp or both, comma-separated")
    if cfg.mbpp and "mbpp" not in benches:  # it would be ignored without a word
        raise UserError(f"--mbpp names MBPP's file, and --bench={cfg.bench} holds no mbpp")
    files = corpus_files(cfg.corpus)
    results = [Path(p.strip()) for p in cfg.results.split(",") if p.strip()]
    for path in results:
        if not path.is_file():
            raise UserError(f"no results file at {path}")
    report_path, out = Path(cfg.report), Path(cfg.out) if cfg.prune_tau else None
    outputs = {"--report": report_path} if out is None else {"--out": out, "--report": report_path}
    check_apart(outputs, {"--corpus": files, "--results": results})
    problems = {}
    for bench in benches:
        found, _ = evaluate.load_problems(bench, cfg.mbpp)
        problems.update({task: p["prompt"] + p["reference"] for task, p in found.items()})
    tasks = list(problems)
    rates = [pass_rates(path, tasks) for path in results]
    model = load_embedder(cfg, cfg.ckpt, start_processes(cfg)[2]) if cfg.ckpt else None
    check_writable(*outputs.values())
    trees = [code_tree(problems[t]) for t in tasks]
    if broken := [t for t, tree in zip(tasks, trees) if tree is None]:  # a user's --mbpp, say
        print(f"note: {len(broken)} of the problems do not parse as prompt and reference ({', '.join(broken[:3])}"
              f"{' ...' if len(broken) > 3 else ''}): they are compared by 13-grams only", file=sys.stderr)
    grams = {}
    for p, task in enumerate(tasks):
        for g in ngrams(problems[task]):
            grams.setdefault(g, set()).add(p)
    counts = np.stack([np.bincount(tree[0] if tree else [], minlength=len(_LABELS))  # problem x label (none:
                       for tree in trees])  # its tau bound is 0, never compared)
    _WORK.update(grams=grams, trees=trees, counts=counts, min_tau=cfg.min_tau)

    ids, doc_tau, parsed, overlapping = [], [], 0, 0
    ngram_docs, ngram_example = Counter(), {}
    best = {p: (0.0, None) for p in range(len(tasks))}
    skipped = Counter()
    identity = files_identity(files)  # a corpus rewritten while compared is not reported on, nor pruned

    def check_unchanged() -> None:
        if files_identity(files) != identity:
            raise changed_while_compared(files)

    def add(doc_id: str, ok: bool, shared: list[int], close: list[tuple[int, float]]) -> None:
        nonlocal parsed, overlapping
        ids.append(doc_id)
        parsed += ok
        overlapping += bool(shared)
        for p in shared:
            ngram_docs[p] += 1
            ngram_example.setdefault(p, doc_id)
        doc_tau.append(max((tau for _, tau in close), default=float("nan")))
        for p, tau in close:
            if tau > best[p][0]:
                best[p] = (tau, doc_id)

    progress = partial_path(report_path)
    state = fingerprint(identity, problems, cfg.min_tau)
    make_folder(report_path)
    if out is not None:
        make_folder(out)
    with contextlib.ExitStack() as held:
        # held to the report's end: a second run, finding the comparison done, would write it too; and one
        # with another --report, but this --out, would write the same OUT.partial at the same time
        held.enter_context(run_lock(report_path.with_name(report_path.name + ".lock"), f"another run is writing "
                                    f"{report_path}: wait for it, stop it, or use another --report", remove=True))
        if out is not None:
            held.enter_context(run_lock(out.with_name(out.name + ".lock"), f"another run is writing {out}: wait "
                                        f"for it, stop it, or use another --out", remove=True))
        before = compared_before(progress, state)
        if before:
            print(f"resuming: {len(before)} documents compared before, in {progress}")
        else:
            progress.unlink(missing_ok=True)
        for result in before:
            add(*result)
        docs = ((doc_id, text) for _, doc_id, text, _ in documents(files, skipped))
        docs = itertools.islice(docs, len(before), None)  # (read, not compared: the skipped lines are counted)
        cores = len(os.sched_getaffinity(0))  # more processes only share them (--workers=100000 forked that many)
        jobs, pool, written = min(cfg.workers or cores, cores), None, Appender(progress)
        try:
            if not before:
                written.write({"fingerprint": state})
            pool = (multiprocessing.get_context("fork").Pool(jobs, worker_signals, (os.getpid(),)) if jobs > 1
                    else None)
            found = pool.imap(compare_document, docs, chunksize=16) if pool else map(compare_document, docs)
            for doc_id, ok, shared, close in tqdm(found, desc="comparing", unit=" docs", initial=len(before)):
                written.write(dict(id=doc_id, ok=ok, shared=shared, close=close))
                add(doc_id, ok, shared, close)
        finally:
            _WORK.clear()
            written.close()
            if pool:
                pool.terminate()
        warn_skipped(skipped, files)
        if not ids:
            raise UserError(f"no documents in {', '.join(map(str, files))}")
        doc_tau = np.array(doc_tau)
        taus = sorted({t for t in TAUS if t >= cfg.min_tau} | {cfg.min_tau}, reverse=True)  # min_tau's too
        rows = [dict(task_id=t, ngram_documents=ngram_docs[p], ngram_example=ngram_example.get(p),
                     tau=best[p][0] or None, tau_document=best[p][1]) for p, t in enumerate(tasks)]
        if model is not None:
            nearest(cfg, model, files, [problems[t] for t in tasks], ids, rows)
        report = dict(corpus=[str(f) for f in files], documents=len(ids), parsed=parsed, benchmarks=",".join(benches),
                      problems=len(tasks), min_tau=cfg.min_tau, documents_with_13gram_overlap=overlapping,
                      documents_by_tau={f"{t:g}": int((doc_tau >= t).sum()) for t in taus},
                      problems_by_tau={f"{t:g}": sum((r["tau"] or 0) >= t for r in rows) for t in taus},
                      embedding=cfg.ckpt or None, by_problem=rows)
        if results:
            names = result_names(results)
            report["similarity"] = similarity_table({r["task_id"]: r["tau"] or 0.0 for r in rows}, names, rates, taus)
        if cfg.prune_tau:
            partial = partial_path(out)
            kept = 0
            try:
                with open(partial, "w", encoding="utf-8") as f:
                    for i, (_, record) in enumerate(read_again(files, ids)):
                        if not doc_tau[i] >= cfg.prune_tau:  # NaN (no close problem) is kept
                            f.write(json.dumps(record, ensure_ascii=False) + "\n")
                            kept += 1
            except BaseException as e:
                partial.unlink(missing_ok=True)
                if isinstance(e, OSError):  # a full disk, after hours of comparing
                    raise cannot_write(out, e) from None
                raise
            try:
                check_unchanged()  # (rewritten with the same ids: read_again would pair results with other texts)
            except UserError:
                partial.unlink()
                raise
            os.replace(partial, out)
            report["pruned"] = dict(tau=cfg.prune_tau, kept=kept, removed=len(ids) - kept, file=str(out))
            print(f"pruned: {len(ids) - kept} of {len(ids)} documents have tau >= {cfg.prune_tau} with some problem; "
                  f"the other {kept} are in {out}")
        check_unchanged()
        write_atomic(report_path, (json.dumps(report, indent=2) + "\n").encode())
        print(f"{len(ids)} documents ({parsed} hold Python that parses) against {len(tasks)} problems of "
              f"{','.join(benches)}: "
              f"{overlapping} share a 13-gram with one; by AST match rate, documents / problems at tau >= "
              + ", ".join(f"{t:g}: {report['documents_by_tau'][f'{t:g}']} / {report['problems_by_tau'][f'{t:g}']}"
                          for t in taus) + f"; report: {report_path}")
        progress.unlink()
    if results:
        print(table_text(report["similarity"], names))
    return report


def compared_before(progress: Path, state: str) -> list[tuple]:
    """The (id, ok, shared, close) that an interrupted run with this state (corpus,
    problems, min_tau) wrote in progress, in corpus order; none for another's, or a file
    that is not one."""
    try:
        records = list(read_jsonl(progress))
        if not records or records[0].get("fingerprint") != state:
            return []
        return [(r["id"], r["ok"], r["shared"], [tuple(c) for c in r["close"]]) for r in records[1:]]
    except (UserError, KeyError, TypeError, AttributeError):
        return []


def changed_while_compared(files: list[Path]) -> UserError:
    return UserError(f"{', '.join(map(str, files))} changed while it was compared: rerun")


def read_again(files: list[Path], ids: list[str]):
    """(text, record) of each document of a second read of the corpus, which must find the
    documents of the first (ids): if it changed in between, one document's result would be
    paired with another document."""
    changed, count = changed_while_compared(files), 0
    for _, doc_id, text, record in documents(files, Counter()):
        if count == len(ids) or doc_id != ids[count]:
            raise changed
        yield text, record
        count += 1
    if count != len(ids):
        raise changed


def nearest(cfg, model, files: list[Path], problem_texts: list[str], ids: list[str], rows: list[dict]) -> None:
    """Add each problem's closest training document by L2 distance of unit-normalised embeddings."""

    def unit(texts):
        X = embed_texts(model, texts, cfg.doc_tokens, cfg.batch_size)[0]
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    bench = unit(problem_texts)
    best, which, start = np.full(len(bench), np.inf), np.zeros(len(bench), np.int64), 0
    texts = (text for text, _ in read_again(files, ids))
    for chunk in tqdm(batched(texts, CHUNK), desc="embedding", unit=" chunks"):
        distance = np.sqrt(np.maximum(2 - 2 * bench @ unit(chunk).T, 0))  # unit vectors: |a-b|^2 = 2 - 2ab
        closer = distance.min(1) < best
        which[closer] = start + distance.argmin(1)[closer]
        best = np.minimum(best, distance.min(1))
        start += len(chunk)
    for row, d, i in zip(rows, best, which):
        row["l2"], row["l2_document"] = round(float(d), 4), ids[i]


# ---------------------------------------------------------------- main

def main(argv=None):
    cfg, args = parse_args(DEFAULTS, __doc__, argv)
    command = globals()[subcommand(args, COMMANDS)]
    with alike_on_every_process():  # under torchrun, said once
        require((isinstance(cfg.seed, int) and cfg.seed >= 0, "--seed must be an integer >= 0"),
                (cfg.workers >= 0, "--workers must be >= 0 (0: one per core)"))
    try:
        command(cfg)
    except RuntimeError as e:
        if "train" in sys.modules:  # (start_processes imported it, if there are processes)
            sys.modules["train"].stop_if_peer_gone(e)
        raise
    finally:
        # never imported here: a signal while torch was imported leaves torch.distributed without
        # its torch, and importing it again runs torch's import into a torch cut short (two tracebacks)
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops as Ctrl-C does: what is done is kept
    run(main)
