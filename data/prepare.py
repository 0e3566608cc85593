"""Turn a corpus into token bins: data/<name>/train.bin, val.bin (flat uint16) and meta.json.
With --output=jsonl, into the same documents as JSONL instead, for filter.py to score.

Sources (--source):
  local  the Python files already on this machine: the interpreter's standard library
         and installed packages (or the folders and files in --inputs, and then the
         default name is local_<first input>, not local_python). No network. Symlinked
         files are read; symlinked folders are not walked into.
  jsonl  JSONL files of {"text": ...} documents, as filter.py and synth.py write them
         (--inputs: comma-separated paths or globs; a ** goes into no symlinked folder).
  hf     a Hugging Face dataset, streamed; needs `pip install datasets` and network.
         Default: The Stack dedup, Python (gated: accept its terms, `huggingface-cli login`).
         StackOverflow: --hf_dataset=bigcode/stackoverflow-clean --hf_data_dir= --name=stackoverflow

Each document is checked (skipped and counted when unreadable, not a regular file (a
FIFO, a device), larger than --max_file_bytes, binary (has NUL bytes), not UTF-8 or
empty; so are a folder that cannot be listed, a JSONL line that is no JSON object, and
a JSON array, not JSONL (json_array)), deduplicated exactly by the sha256
of its bytes, and put in val when a hash of its content falls under --val_fraction: the
split never depends on paths or order, so it is the same on every run and machine. A
small corpus that the hash leaves without train (or val) documents gets one moved over;
a corpus of one document has it in train. Documents are tokenized on all cores with the
phi-1 tokenizer, each followed by <|endoftext|>; np.memmap(path, dtype=np.uint16) reads
the bins.

--output=jsonl writes the kept documents (checked and deduplicated the same way, no
val split) as data/<name>/part-00000.jsonl, ... (default name: the bins' + "_jsonl")
of {"id", "text"} records, what
filter.py annotates, embeds and filters. The id says where a document came from:
its path (local; a byte of a name that is not UTF-8 as \\xNN), the record's own "id" or
path:line (jsonl), dataset:row (hf). An input that the run would delete or overwrite (a
part-*.jsonl, bin or meta.json in its own folder) is refused, as is a folder holding such
files that prepare.py did not write (no meta.json): they are someone else's.

Idempotent: meta.json (written last) holds a fingerprint of the inputs, the settings
and the code, and a rerun with the same fingerprint does nothing. The work is done in
parts of about 64 MB of text, each with a done marker, so a rerun after a kill reads
the source again but tokenizes only the parts not yet done.

    python data/prepare.py                                    # -> data/local_python/
    python data/prepare.py --inputs=../myproject              # -> data/local_myproject/
    python data/prepare.py --source=jsonl --inputs='synth/*.jsonl' --name=textbooks
    python data/prepare.py --source=hf --max_docs=1000000 --name=stack_python
    python data/prepare.py --source=hf --output=jsonl --name=web_stack   # for filter.py
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import site
import stat
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from config import UserError, parse_settings, run  # noqa: E402
from tokenizer import EOT, VOCAB_SIZE, encode  # noqa: E402

DEFAULTS = dict(
    source="local",            # local | jsonl | hf (see above)
    output="bins",             # bins (train.bin, val.bin: what train.py reads) or jsonl (documents, for filter.py)
    name="",                   # output folder data/<name>/ or an absolute path ("" = local_python or, with --inputs, local_<1st input>; hf dataset; 1st jsonl file)
    out_dir="",                # folder that holds <name> ("" = this script's folder, data/)
    inputs="",                 # jsonl: files or globs, comma-separated; local: folders to read instead of the interpreter's
    val_fraction=0.01,         # share of documents (by content hash) that go to val.bin
    max_file_bytes=1_000_000,  # skip larger documents (generated code, embedded data)
    max_bytes=0,               # stop after this many bytes of kept documents (0 = no limit)
    max_docs=0,                # stop after this many kept documents (0 = no limit)
    workers=0,                 # tokenizer processes (0 = all cores; never more than the cores)
    seed=0,                    # salt of the train/val hash: another seed, another val set
    hf_dataset="bigcode/the-stack-dedup",  # hf: dataset on the Hugging Face Hub
    hf_config="",              # hf: configuration name ("" = none)
    hf_data_dir="data/python", # hf: folder inside the dataset ("" = none)
    hf_split="train",          # hf: split to read
    hf_text_field="content",   # hf: field holding a document's text
)

assert VOCAB_SIZE <= 2**16, "token ids must fit uint16"
PART_BYTES = 64 << 20  # text per part: the unit of resuming, and what is held in memory
TASK_BYTES = 1 << 20   # text per task handed to a tokenizer process
HERE = Path(__file__).resolve().parent
# settings that don't change the bins; the inputs count by the files they name (the listing),
# not by how they are spelled (relative or absolute, a glob)
UNFINGERPRINTED = ("name", "out_dir", "workers", "inputs")
REPLACED = ("part-*.jsonl", "train.bin", "val.bin", "meta.json")  # what a run removes or rewrites in its folder


# ---------------------------------------------------------------- sources
# A source lists what it is made of (cheap: for the fingerprint) and yields items
# (data: bytes | None, skip reason: str | None, bytes read from the source).

def distinct_roots(paths) -> list[Path]:
    """Existing paths, resolved, without repeats; a root inside another is walked with it,
    but for a file that the walk would not take (not .py: named, it is read whatever its name)."""
    roots = sorted({Path(p).resolve() for p in paths if Path(p).exists()}, key=lambda p: (len(p.parts), p))
    kept: list[Path] = []
    for root in roots:
        if not any(root.is_relative_to(k) for k in kept) or (not root.is_dir() and root.suffix != ".py"):
            kept.append(root)
    return kept


def interpreter_roots() -> list[Path]:
    """The standard library and the installed packages of the running interpreter."""
    paths = sysconfig.get_paths()
    return distinct_roots([paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
                          + site.getsitepackages())


def stamp(st: os.stat_result) -> list[int]:
    """What says a listed file changed, for the fingerprint: its modification time, and its
    mode (a chmod that makes a file skipped as unreadable readable leaves the time alone).
    Not the ctime, which a copy with cp -a or rsync -a changes too: a dataset moved to
    another machine would be made again. (An edit that keeps the size and sets the time
    back, as touch -r does, goes unseen.)"""
    return [st.st_mtime_ns, st.st_mode]


def list_python_files(roots: list[Path]) -> tuple[list[tuple[str, int, list]], list[str]]:
    """(path, size, stamp) of every .py file under the roots (a root may be a file of any
    name), sorted, size -1 where stat fails, so the file counts as unreadable; and the
    folders that could not be listed, counted too. Symlinked files are read, symlinked
    folders are not walked into: a link to a parent would loop, one to a sibling read twice."""
    paths, unlisted = [], []
    for root in roots:
        if not root.is_dir():  # named in --inputs: even a FIFO or a device, which is then skipped
            paths.append(root)
            continue
        for folder, subfolders, files in os.walk(root, onerror=lambda e: unlisted.append(e.filename)):
            subfolders[:] = [d for d in subfolders if d != "__pycache__"]
            paths += [Path(folder, f) for f in files if f.endswith(".py")]
    listing = []
    for path in sorted(paths):
        try:
            st = path.stat()
            listing.append((str(path), st.st_size, stamp(st)))
        except OSError:
            listing.append((str(path), -1, []))
    return listing, sorted(unlisted)


def read_regular(path: str, limit: int) -> bytes | None:
    """At most limit bytes of path, or None if it is not a regular file: the open of a FIFO
    waits for a writer, a device such as /dev/zero never ends (its size says 0), and
    opening some devices acts (a tape rewinds)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return None
    # non-blocking: a FIFO put there since the stat cannot hold the open
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        return f.read(limit)


# A source yields one item per document: (utf-8 bytes or None, why it is skipped or None,
# bytes read from the source, the document's id); (None, None, ...) where bytes read hold
# no document (a blank JSONL line), for the progress bar.

def local_items(listing, unlisted: list[str], max_file_bytes: int):
    for folder in unlisted:
        yield None, "unreadable_folder", 0, folder
    for path, size, _ in listing:
        if size < 0:
            yield None, "unreadable", 0, path
        elif size > max_file_bytes:  # not even read
            yield None, "too_big", size, path
        else:
            try:  # one byte over the limit: check() then skips a file that grew since it was listed
                data = read_regular(path, max_file_bytes + 1)
            except OSError:
                yield None, "unreadable", size, path
                continue
            if data is None:
                yield None, "special_file", 0, path
            else:
                yield data, None, size, path_id(path)


def path_id(path: str) -> str:
    """A local document's id: its path, with each byte of a name that is not UTF-8 as a
    backslash escape (caf\\xe9.py): Python reads such a byte as a lone surrogate, which no
    UTF-8 output can hold, and filter.py would drop the document for it."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_id(doc_id: str) -> str:
    """An id as UTF-8 can write it: a lone surrogate ("\\ud800" in JSON) as a backslash
    escape, so that filter.py, which skips lines holding one, keeps the document."""
    return doc_id.encode("utf-8", "backslashreplace").decode()


def glob_files(pattern: str) -> list[str]:
    """What glob.glob(pattern, recursive=True) finds (but no folder for a last **), except
    that a ** goes into no symlinked folder: glob's would, and two links to "." make its
    search explode (every path through them is another folder). A link that the pattern
    spells out, or matches with * or ?, is followed."""
    parts = Path(pattern).parts
    if "**" not in parts:
        return glob.glob(pattern)
    i = parts.index("**")
    found = []
    for top in glob.glob(os.path.join(*parts[:i])) if i else [""]:
        for folder, subfolders, files in os.walk(top or os.curdir):  # lists symlinked folders, goes into none
            folder = folder if top else folder[2:]  # "./in" as glob spells it: "in"
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # nor hidden ones, as glob's **
            if i + 1 < len(parts):
                found += glob_files(os.path.join(glob.escape(folder), *parts[i + 1:]))
            else:
                found += [os.path.join(folder, f) for f in files if not f.startswith(".")]
    return found


def expand(inputs: str, setting: str = "--inputs") -> list[Path]:
    """The regular files named by comma-separated paths and globs (see glob_files), in order,
    each once however it is spelled; setting names the flag in the error for an empty list."""
    files: list[Path] = []
    seen: set[Path] = set()
    for entry in filter(None, (s.strip() for s in inputs.split(","))):
        if Path(entry).is_file():  # first: a name may hold [ or * (ex[v2].jsonl)
            matches = [Path(entry)]
        elif any(c in entry for c in "*?["):
            matches = [Path(p) for p in sorted(glob_files(entry)) if Path(p).is_file()]
            if not matches:
                raise UserError(f"no file matches {entry}")
        elif Path(entry).exists():  # a FIFO or a device: its lines might never end
            raise UserError(f"not a regular file: {entry}")
        else:
            raise UserError(f"no such file: {entry}")
        for path in matches:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
    if not files:
        raise UserError(f"{setting} is needed: a JSONL file (or comma-separated paths and globs)")
    return files


def text_item(text, nbytes: int, doc_id: str):
    """The item of a document's text from JSON or a dataset row (nbytes 0: its size)."""
    if not isinstance(text, str):
        return None, "no_text", nbytes, doc_id
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, which JSON can spell as "\ud800"
        return None, "not_utf8", nbytes, doc_id
    return data, None, nbytes or len(data), doc_id


def jsonl_items(files: list[Path], max_file_bytes: int):
    # JSON spells a byte of text in at most 6 (\u0000, or \uXXXX for each 3-byte character): a
    # longer line holds a document over max_file_bytes, and is passed over rather than held and
    # parsed whole (a JSON array of 175 MB on one line took 1.5 GB)
    limit = 6 * max_file_bytes + (1 << 16)  # and room for the id
    for path in files:
        try:
            f = open(path, "rb")
        except OSError:
            yield None, "unreadable", 0, str(path)
            continue
        resolved = path.resolve()
        with f:
            for number, line in enumerate(iter(lambda: f.readline(limit + 1), b""), 1):
                where = f"{path_id(str(resolved))}:{number}"  # filter.py's name for a document without an id
                size = len(line)
                if size > limit and not line.endswith(b"\n"):  # only its start was read
                    size += skip_line(f)
                    reason = "too_big"
                elif not line.strip():  # a blank line holds no document, as read_jsonl and filter.py agree
                    yield None, None, size, where
                    continue
                else:
                    try:  # UTF-8 only: json.loads of bytes takes UTF-16 too, whose lines cut at \n bytes read garbled
                        doc = json.loads(line.decode("utf-8-sig"))
                        reason = None if isinstance(doc, dict) else "bad_json"
                    except UnicodeDecodeError:
                        reason = "not_utf8"
                    except (ValueError, RecursionError):  # not JSON, or nested too deep
                        reason = "bad_json"
                if reason:  # a file of one JSON array, not JSON lines, is named for what it is
                    yield None, "json_array" if number == 1 and line.startswith(b"[") else reason, size, where
                    continue
                doc_id = doc.get("id")  # "id": null is no id, not the id "None"
                yield text_item(doc.get("text"), size, where if doc_id is None else utf8_id(str(doc_id)))


def skip_line(f) -> int:
    """Reads binary file f on to the end of its line, keeping nothing; returns the bytes read."""
    skipped = 0
    for chunk in iter(lambda: f.readline(1 << 20), b""):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def hf_items(cfg):
    """The rows of a streamed Hugging Face dataset. Opens the stream and reads its first row
    now, so that a missing package, a wrong name, no network or a wrong --hf_text_field is a
    UserError before anything is written: a field that no row has would otherwise stream
    the whole dataset (hours of The Stack), every row skipped, to end on "no usable documents"."""
    try:
        import datasets
    except ImportError:
        raise UserError("--source=hf needs the datasets package: pip install datasets") from None

    def why(e: Exception) -> str:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"

    try:
        rows = iter(datasets.load_dataset(cfg.hf_dataset, cfg.hf_config or None, split=cfg.hf_split,
                                          data_dir=cfg.hf_data_dir or None, streaming=True))
        head = list(itertools.islice(rows, 1))  # the first row: none in an empty dataset
    except Exception as e:  # not found, gated, offline: the user's to fix; the message says which
        raise UserError(f"cannot open {cfg.hf_dataset}: {why(e)}") from None
    if head and cfg.hf_text_field not in head[0]:  # (there but null: that row is skipped as no_text)
        raise UserError(f"--hf_text_field={cfg.hf_text_field} is no field of {cfg.hf_dataset}, "
                        f"whose rows have: {', '.join(map(str, head[0]))}")

    def items():
        row_number = 0
        try:
            for row_number, row in enumerate(itertools.chain(head, rows)):
                yield text_item(row.get(cfg.hf_text_field), 0, f"{cfg.hf_dataset}:{row_number}")
        except Exception as e:  # the network dropped hours into The Stack: one line, the parts kept
            raise UserError(f"reading {cfg.hf_dataset} failed after row {row_number}: {why(e)}; rerun to go on "
                            f"from the finished parts") from None
    return items()


def open_source(cfg) -> SimpleNamespace:
    """The source's default name, a description for meta.json, what it is made of (for the
    fingerprint), its size in bytes (None if unknown) and a function that opens its items.
    Checks that the inputs exist; reads none of them."""
    given = [key for key in DEFAULTS if getattr(cfg, key) != DEFAULTS[key]
             and (key.startswith("hf_") if cfg.source != "hf" else key == "inputs")]
    if given:  # it would be ignored without a word
        raise UserError(f"--{given[0]} is no setting of --source={cfg.source}")
    if cfg.source == "local":
        entries = [s.strip() for s in cfg.inputs.split(",") if s.strip()]
        for entry in entries:
            if not Path(entry).exists():
                raise UserError(f"no such file or folder: {entry}")
        roots = distinct_roots(entries) if entries else interpreter_roots()
        listing, unlisted = list_python_files(roots)
        # a few chosen files must not take the place of the corpus a bare train.py trains on
        first = Path(entries[0]).resolve() if entries else None
        name = f"local_{first.stem if first.is_file() else first.name}" if first else "local_python"
        return SimpleNamespace(name=name, inputs=[str(r) for r in roots], listing=listing,
                               total=sum(max(size, 0) for _, size, _ in listing),
                               items=lambda: local_items(listing, unlisted, cfg.max_file_bytes))
    if cfg.source == "jsonl":
        files = expand(cfg.inputs)
        listing = [(str(p.resolve()), p.stat().st_size, stamp(p.stat())) for p in files]  # as list_python_files
        return SimpleNamespace(name=files[0].stem, inputs=[path for path, _, _ in listing], listing=listing,
                               total=sum(size for _, size, _ in listing),
                               items=lambda: jsonl_items(files, cfg.max_file_bytes))
    if cfg.source == "hf":
        return SimpleNamespace(name=Path(cfg.hf_dataset).name, inputs=[cfg.hf_dataset], listing=[],
                               total=None, items=lambda: hf_items(cfg))
    raise UserError(f"unknown --source={cfg.source} (local, jsonl or hf)")


# ---------------------------------------------------------------- documents

def check(data: bytes, max_file_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) for a usable document, (None, reason) for one to skip."""
    if len(data) > max_file_bytes:
        return None, "too_big"
    if b"\x00" in data:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if not text.strip():
        return None, "empty"
    return text, None


def in_val(digest: bytes, cfg) -> bool:
    """Whether a document goes to val: a hash of its content (and the seed), so the split
    depends on nothing else and duplicates agree. JSONL output has no val."""
    h = hashlib.sha256(b"%d:" % cfg.seed + digest).digest()
    return cfg.output == "bins" and int.from_bytes(h[:8], "big") < cfg.val_fraction * 2**64


def parts(items, cfg, counts: Counter, skipped: Counter):
    """The usable, new documents grouped into parts of about PART_BYTES of text: yields
    ({"train": [(id, text), ...], "val": [...]}, bytes read from the source). Cut the same
    way on every run over the same source, which is what lets a rerun reuse finished parts."""
    seen: set[bytes] = set()
    docs, size, read = {"train": [], "val": []}, 0, 0
    for data, reason, nbytes, doc_id in items:
        read += nbytes
        if data is None and reason is None:  # bytes that hold no document: read, for the bar
            continue
        data = data and data.removeprefix(b"\xef\xbb\xbf")  # a byte order mark is no part of the code
        text, reason = (None, reason) if reason else check(data, cfg.max_file_bytes)
        if reason:
            skipped[reason] += 1
            continue
        digest = hashlib.sha256(data).digest()
        if digest in seen:
            counts["duplicates"] += 1
            continue
        seen.add(digest)
        split = "val" if in_val(digest, cfg) else "train"
        docs[split].append((doc_id, text))
        counts[split] += 1
        counts["bytes"] += len(data)
        size += len(data)
        full = (cfg.max_docs and counts["train"] + counts["val"] >= cfg.max_docs
                or cfg.max_bytes and counts["bytes"] >= cfg.max_bytes)
        if size >= PART_BYTES or full:
            yield docs, read
            docs, size, read = {"train": [], "val": []}, 0, 0
        if full:
            return
    if docs["train"] or docs["val"] or read:
        yield docs, read


def encode_docs(texts: list[str]) -> np.ndarray:
    """The texts' tokens, each text followed by EOT, in one uint16 array (runs in a worker:
    the parallelism is the worker processes). A literal "<|endoftext|>" stays text."""
    ids: list[int] = []
    for text in texts:
        ids += encode(text)
        ids.append(EOT)
    return np.array(ids, dtype=np.uint16)


def tokenize(texts: list[str], workers: int, bar) -> np.ndarray:
    """encode_docs over all texts, in TASK_BYTES tasks on at most workers processes (the
    results in order), or here for a single task. A process pool of the standard library's
    futures: where a worker dies (killed, out of memory), multiprocessing's Pool starts
    another but loses its task, and waits for it for ever."""
    tasks, task, size = [], [], 0
    for text in texts:
        task.append(text)
        size += len(text)
        if size >= TASK_BYTES:
            tasks.append(task)
            task, size = [], 0
    if task:
        tasks.append(task)
    workers = min(workers, len(tasks))
    # forked: the workers start with the tokenizer loaded (and a test's patches)
    pool = (ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), initializer=worker_signals,
                                initargs=(os.getpid(),)) if workers > 1 else None)
    arrays = []
    try:
        for task, ids in zip(tasks, (pool.map if pool else map)(encode_docs, tasks)):
            arrays.append(ids)
            bar.update(sum(map(len, task)))
    except BrokenProcessPool:
        raise UserError("a tokenizer process died (killed, or out of memory?): "
                        "rerun to go on from the finished parts") from None
    except BaseException:
        # a stop (Ctrl-C, SIGTERM) between the workers' fork and the start of the pool's thread,
        # which ends them, left them idle and the exit waiting on them for ever: they go now. Not
        # once that thread runs: shutdown ends them, and killed under it, the pool's broken-pool
        # path met the futures map() had cancelled and died, leaving a task stuck in the pipe to
        # them, which the exit then waited on (1 in ~20 stops)
        manager = pool and pool._executor_manager_thread
        if pool and not (manager and manager.is_alive()):
            for worker in list(pool._processes.values()):
                worker.kill()
        raise
    finally:
        if pool:  # the tasks not begun are dropped: a Ctrl-C waits only for those running
            pool.shutdown(cancel_futures=True)
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


# ---------------------------------------------------------------- output

def output_dir(cfg, default_name: str) -> Path:
    """Where the output goes; JSONL's default folder is not the bins' (data/<name>_jsonl)."""
    suffix = "_jsonl" if cfg.output == "jsonl" else ""
    return Path(cfg.out_dir or HERE) / (cfg.name or default_name + suffix)


def fingerprint(cfg, listing) -> str:
    """What the bins are a function of: the inputs, the settings that matter, and the
    code that splits and tokenizes (this file and tokenizer.py)."""
    settings = {k: v for k, v in vars(cfg).items() if k not in UNFINGERPRINTED}
    digest = hashlib.sha256(json.dumps([settings, listing]).encode())
    for code in (Path(__file__), ROOT / "tokenizer.py"):
        digest.update(code.read_bytes())
    return digest.hexdigest()


def check_inputs_kept(out: Path, listing) -> None:
    """Refuse an input that this run would delete or overwrite: a file in its folder of the
    kinds it replaces (part-*.jsonl, the bins, meta.json) or in its parts folder."""
    folder = str(out.resolve()) + os.sep
    for path, _, _ in listing:  # absolute paths (resolved, for a jsonl source)
        rest = path[len(folder):] if path.startswith(folder) else None
        if rest and (rest.startswith("parts" + os.sep) or os.sep not in rest and any(
                Path(rest).match(pattern) for pattern in REPLACED)):
            raise UserError(f"--inputs takes {path}, which this run would delete or overwrite in {out}: "
                            f"give another --name or --out_dir")


def check_ours(out: Path) -> None:
    """Refuse a folder holding files of the kinds a run replaces that no run of ours wrote
    (no meta.json, no parts folder of an interrupted run): they would go without a word."""
    if read_meta(out) is not None or (out / "parts" / "fingerprint").is_file():
        return
    theirs = sorted(path.name for pattern in REPLACED for path in out.glob(pattern))
    if theirs:
        raise UserError(f"{out} holds {', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''} but no "
                        f"meta.json: not a folder prepare.py wrote, and this run would replace them; give "
                        f"another --name or --out_dir")


def read_meta(folder: Path) -> dict | None:
    """A prepared folder's meta.json, or None if it has none that reads as a JSON object."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def finished(out: Path, fp: str) -> dict | None:
    """meta.json of a complete earlier run with this fingerprint, else None."""
    meta = read_meta(out)
    try:
        complete = all((out / name).stat().st_size == size for name, size in meta["files"].items())
    except (OSError, KeyError, TypeError, AttributeError):  # TypeError: no meta at all
        return None
    return meta if complete and meta.get("fingerprint") == fp else None


def start(out: Path, fp: str) -> Path:
    """The parts folder for this run, keeping the parts of an interrupted run with the
    same fingerprint. A prepared dataset already in out stays whole until its bins are
    replaced (see prepare)."""
    part_dir = out / "parts"
    try:
        mark = part_dir / "fingerprint"
        if part_dir.exists() and not (mark.is_file() and mark.read_text() == fp):
            shutil.rmtree(part_dir)
        part_dir.mkdir(exist_ok=True)
        mark.write_text(fp)
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    return part_dir


# ---------------------------------------------------------------- JSONL files that grow
# (synth.py, filter.py and evaluate.py append records as they come, and resume after a kill)

def read_jsonl(path: Path, numbered: bool = False):
    """The records of a JSONL file, one by one (numbered: with their line numbers). A last
    line torn by a kill is left out (Appender cuts it off); any other line that is not a
    JSON object is an error."""
    if not path.exists():
        return
    try:
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: nested too deep
                    record = None
                if not isinstance(record, dict):
                    if not line.endswith(b"\n"):
                        return  # torn
                    raise UserError(f"{path} line {number} is not a JSON object, as every line of a JSONL file is")
                yield (number, record) if numbered else record
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def json_line(record: dict) -> bytes:
    """One JSONL line; a lone surrogate (a file name or a teacher's answer can hold one),
    which UTF-8 cannot, is kept as a \\u escape."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode()


class Appender:
    """Appends JSON lines to path, each flushed. The file is opened at the first line, after
    cutting off a last line torn by a kill (or ending a whole one that lacks its newline).
    A write that fails (a full disk) is a UserError: the lines before it are whole, and the
    one it tore is cut off when the next run appends."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def write(self, obj: dict) -> None:
        try:
            if self.file is None:
                self.file = self.open()
            self.file.write(json_line(obj))
            self.file.flush()
        except OSError as e:
            file, self.file = self.file, None
            with contextlib.suppress(OSError):  # its buffer still holds the line, failing again
                if file is not None:
                    file.close()
            raise cannot_write(self.path, e) from None

    def close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError as e:
                raise cannot_write(self.path, e) from None

    def open(self):
        """The file for appending text, its last line made whole first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as f:
            start = f.seek(0, os.SEEK_END)
            while start > 0:  # back to the start of the last line
                step = min(start, 1 << 16)
                f.seek(start - step)
                newline = f.read(step).rfind(b"\n")
                start -= step
                if newline >= 0:
                    start += newline + 1
                    break
            f.seek(start)
            try:
                tail = f.read()
                if tail:
                    json.loads(tail)
                    f.write(b"\n")
            except (ValueError, RecursionError):
                print(f"note: cutting off the torn last line of {self.path}", file=sys.stderr)
                f.truncate(start)
        return self.path.open("ab")


def check_writable(*paths: Path) -> None:
    """Fail now, in one line, on an output that could not be written later. Creates
    nothing: the folders are made by whatever writes into them, so a run that stops
    on a later error leaves no empty folder behind."""
    for path in paths:
        if path.is_dir():
            raise UserError(f"cannot write {path}: it is a directory")
        if path.is_fifo():  # its open would wait for a reader, for ever
            raise UserError(f"cannot write {path}: it is a FIFO")
        try:
            os.stat(path)
        except OSError as e:  # a symlink loop on the way, which exists() below takes for nothing there
            if e.errno == errno.ELOOP:
                raise UserError(f"cannot write {path}: {e.strerror}") from None
        if path.exists() and not path.is_file():  # /dev/null: its sidecars, temporary files, would go to /dev
            raise UserError(f"cannot write {path}: it is not a regular file (a device or a socket)")
        folder = next(p for p in path.parents if p.exists())  # the nearest one there already
        if not folder.is_dir():
            raise UserError(f"cannot write {path}: {folder} is a file, not a folder")
        try:  # a real attempt: as root, os.access says yes to /proc and to read-only mounts
            if path.exists():
                open(path, "ab").close()  # appends nothing, changes nothing
            else:
                tempfile.TemporaryFile(dir=folder).close()  # gone when closed
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def run_lock(path: Path, busy: str, *, remove: bool = False):
    """Held while one run uses path (a folder that exists, or a file, made if new): another
    run stops at once with UserError(busy). An flock, gone with the process however it ends.
    remove: path is a lock file of its own, removed as the run ends. (A work file that the
    run renames in the end cannot be the lock: a run starting after the rename would lock
    a new file at the old name while the first still finishes.)"""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as e:
            raise cannot_write(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(busy) from None
        except OSError as e:  # a file system without locks (ENOLCK on some NFS mounts, EOPNOTSUPP on FUSE)
            print(f"warning: cannot lock {path} ({e.strerror}): make sure no other run uses it at the same time",
                  file=sys.stderr)
        try:  # a lock file removed as we took it (its run ended) locks nothing: take the new one
            if not remove or os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        if remove:  # before the lock goes: a run waiting for it finds the file gone
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


def cannot_write(path: Path, e: Exception) -> UserError:
    """The one line for a write that failed; a full disk also says how much space is free.
    e is an OSError, or torch.save's RuntimeError, which hides the disk's errno: the
    free space is then shown too, the likeliest cause."""
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:120]
    if not isinstance(e, OSError) or e.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):  # after the caller freed what it half wrote
            folder = next(p for p in path.parents if p.exists())
            reason += f" ({shutil.disk_usage(folder).free / 2**30:.1f} GiB free there)"
    return UserError(f"cannot write {path}: {reason}")


def write_atomic(path: Path, data: bytes) -> None:
    """path holds data whole or not at all. A failed write (a full disk) removes its .tmp,
    which would hold the space, and is a UserError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise cannot_write(path, e) from None


def concatenate(sources: list[Path], path: Path) -> None:
    """path made of the sources end to end, whole or not at all, as write_atomic. A disk
    that cannot hold the copy beside the sources is a UserError before it is begun, not
    after it has filled the disk."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        need, free = sum(src.stat().st_size for src in sources), shutil.disk_usage(path.parent).free
        if need > free:
            raise UserError(f"cannot write {path}: it takes {need / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB "
                            f"are free there (the parts it is made of are kept: free some space and rerun)")
        with open(tmp, "wb") as f:
            for src in sources:
                with open(src, "rb") as part:
                    shutil.copyfileobj(part, f, 1 << 24)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise cannot_write(path, e) from None


def move_document(src: Path, dst: Path, window: int = 1 << 22) -> int:
    """Move a document of src to dst, which is empty: for a small corpus whose hash split gave
    train or val none. The last one that leaves src at least as many tokens as it takes (the
    last outright could leave train 32 tokens beside a 200 KB file in val), else the last.
    Only the window at src's end is searched; tokens moved (0 if no document starts there)."""
    data = np.memmap(src, dtype=np.uint16, mode="r")
    start = max(0, len(data) - window)
    bounds = np.flatnonzero(data[start:] == EOT) + start + 1  # every document ends with EOT
    if start == 0:
        bounds = np.concatenate([[0], bounds])  # the first document starts there too
    if len(bounds) < 2:
        return 0
    sizes = np.diff(bounds)
    fits = np.flatnonzero(2 * sizes <= len(data))
    i = fits[-1] if len(fits) else len(sizes) - 1
    cut, end = int(bounds[i]), int(bounds[i + 1])
    write_atomic(dst, data[cut:end].tobytes())
    after = np.array(data[end:])  # the documents after it move up: within the window, so in memory
    del data
    with open(src, "r+b") as f:  # not atomic: a run killed before meta.json joins the parts again
        f.seek(cut * 2)
        f.write(after.tobytes())
        f.truncate()
    return end - cut


def give_up(out: Path, part_dir: Path) -> None:
    """Remove what this run wrote, before a UserError."""
    shutil.rmtree(part_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        out.rmdir()  # only if empty


# ---------------------------------------------------------------- pipeline

def worker_signals(parent: int) -> None:
    """The start of a process pool's worker (prepare's tokenizers, filter.py's, synth.py's),
    forked by the process parent (its pid, passed as the pool's initargs). It is in a
    process group of its own: Ctrl-C, or the SIGTERM a scheduler sends the job's group,
    reaches the main process alone, which stops the pool (a worker killed while it held
    the pool's queue lock could hang that for good). The SIGTERM that stops it kills it,
    not the KeyboardInterrupt of the handler a script's __main__ set, and SIGINT is
    ignored, so no worker prints a traceback. It dies with the main process, even a kill -9
    of that (Linux), rather than work on alone, holding the run's lock, to a broken pipe;
    also where that came before the death signal was set (the parent is another then)."""
    os.setpgrp()
    with contextlib.suppress(AttributeError, OSError):  # no prctl: not Linux
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # gone already: orphans held the run's lock (flock) for ever
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def prepare(cfg, quiet: bool = False) -> dict:
    """Prepare the corpus cfg describes (settings as in DEFAULTS); returns its meta.json."""
    if cfg.output not in ("bins", "jsonl"):
        raise UserError(f"--output must be bins or jsonl, not {cfg.output!r}")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), not {cfg.val_fraction}")
    if cfg.max_file_bytes <= 0 or min(cfg.max_bytes, cfg.max_docs, cfg.workers) < 0:
        raise UserError("--max_file_bytes must be positive, --max_bytes --max_docs --workers not negative")
    if cfg.name and Path(cfg.name).name in ("", ".", ".."):  # the output would go into out_dir or above it
        raise UserError(f"--name={cfg.name} names no folder of its own (a dataset's name, e.g. code_filtered)")
    t0 = time.time()
    source = open_source(cfg)
    out = output_dir(cfg, source.name)
    check_inputs_kept(out, source.listing)
    check_ours(out)
    fp = fingerprint(cfg, source.listing)
    meta = finished(out, fp)
    if meta:
        mark = out / "parts" / "fingerprint"
        if (out / "parts").is_dir() and (not mark.exists() or mark.read_text() == fp):
            shutil.rmtree(out / "parts", ignore_errors=True)  # what a kill left of this run's cleanup
        if not quiet:
            print(f"already prepared: {out} ({summary(meta)})")
        return meta

    previous = read_meta(out) or {"output": cfg.output}
    earlier = previous.get("output", "bins")
    # the user may have meant two datasets (two outputs, or two inputs of one default name): say so first
    if earlier != cfg.output and not quiet:
        kinds = {"bins": "token bins", "jsonl": "JSONL documents"}
        print(f"{out} holds {kinds.get(earlier, earlier)} from an earlier run: this run replaces them with "
              f"{kinds[cfg.output]} (another --name keeps both)")
    elif previous.get("inputs", source.inputs) != source.inputs and not quiet:
        print(f"{out} holds a dataset of other inputs ({', '.join(map(str, previous['inputs']))}): this run "
              f"replaces it (another --name keeps both)")
    bins = cfg.output == "bins"
    if bins:
        encode("")  # loads the BPE file now: offline without a copy, stop before writing anything
    items = source.items()  # opens a stream now: a missing package or dataset stops here too
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    # one run at a time: two would write one parts folder, and one would remove the other's bins
    with run_lock(out, f"another run is preparing {out}: wait for it, stop it, or use another --name"):
        part_dir = start(out, fp)
        counts, skipped = Counter(), Counter()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cfg.workers or cores, cores)  # more would only take turns on them
        n_parts = 0
        # the bar is closed however the loop ends, so an error or "interrupted" gets a line of its own
        with tqdm(total=source.total, unit="B", unit_scale=True, desc=f"prepare {out.name}",
                  disable=quiet, smoothing=0.05) as bar:
            for i, (docs, read) in enumerate(parts(items, cfg, counts, skipped)):
                done = part_dir / f"{i:05d}.done"
                if not done.exists():
                    if bins:
                        for split, split_docs in docs.items():
                            texts = [text for _, text in split_docs]
                            write_atomic(part_dir / f"{i:05d}.{split}.bin", tokenize(texts, workers, bar).tobytes())
                            read -= sum(map(len, texts))  # already on the bar
                    else:
                        write_atomic(part_dir / f"{i:05d}.jsonl", b"".join(json_line({"id": doc_id, "text": text})
                                                                            for doc_id, text in docs["train"]))
                    write_atomic(done, b"")
                bar.update(read)
                n_parts = i + 1
        if not counts["train"] + counts["val"]:
            give_up(out, part_dir)
            raise UserError(f"no usable documents in {', '.join(source.inputs)} (skipped: {dict(skipped) or 'none'})")

        (out / "meta.json").unlink(missing_ok=True)  # the old output goes now: nothing looks complete until the end
        meta = dict(source=cfg.source, inputs=source.inputs, output=cfg.output,
                    **(join_bins(out, part_dir, n_parts, counts, cfg.val_fraction) if bins
                       else move_jsonl(out, part_dir, n_parts, counts)),
                    document_bytes=counts["bytes"], duplicates=counts["duplicates"],
                    skipped=dict(sorted(skipped.items())),
                    settings={k: v for k, v in vars(cfg).items() if k not in UNFINGERPRINTED},
                    fingerprint=fp)
        write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        shutil.rmtree(part_dir, ignore_errors=True)
        if not quiet:
            print(f"{out}: {summary(meta)}, {counts['duplicates']:,} duplicates, "
                  f"skipped {dict(skipped) or 'none'}, {time.time() - t0:.0f}s")
            if bins and not counts["val"] and counts["train"] == 1:
                print("warning: val.bin is empty: the corpus's one document is in train.bin "
                      "(train.py needs --eval_interval=0 to train on it alone)")
            elif bins and not counts["val"]:
                print(f"warning: val.bin is empty; raise --val_fraction (now {cfg.val_fraction})")
        return meta


def join_bins(out: Path, part_dir: Path, n_parts: int, counts: Counter, val_fraction: float) -> dict:
    """train.bin and val.bin from the parts' bins; meta.json's entries about them."""
    for stale in out.glob("part-*.jsonl"):  # an earlier --output=jsonl here: globs must not find them
        stale.unlink()
    tokens = {}
    for split in ("train", "val"):
        files = [part_dir / f"{i:05d}.{split}.bin" for i in range(n_parts)]
        concatenate(files, out / f"{split}.bin")
        tokens[split] = sum(f.stat().st_size for f in files) // 2
    # a small corpus whose hash split left a side empty: train gets one of val's documents, or
    # val one of train's if it has two (one document cannot be both trained and validated on)
    if not tokens["train"] or (not tokens["val"] and val_fraction > 0 and counts["train"] >= 2):
        src, dst = ("val", "train") if not tokens["train"] else ("train", "val")
        moved = move_document(out / f"{src}.bin", out / f"{dst}.bin")
        tokens[src] -= moved
        tokens[dst] += moved
        counts[src] -= bool(moved)
        counts[dst] += bool(moved)
    return dict(tokenizer="phi-1 (CodeGen): GPT-2 BPE (tiktoken r50k_base) + 38 whitespace tokens",
                vocab_size=VOCAB_SIZE, eot=EOT, dtype="uint16",
                train_tokens=tokens["train"], val_tokens=tokens["val"],
                train_documents=counts["train"], val_documents=counts["val"],
                files={f"{split}.bin": 2 * tokens[split] for split in ("train", "val")})


def move_jsonl(out: Path, part_dir: Path, n_parts: int, counts: Counter) -> dict:
    """The parts' JSONL files moved to out/part-NNNNN.jsonl; meta.json's entries about them.
    A part already moved by a finish that was killed is in place (its done marker says so)."""
    names = [f"part-{i:05d}.jsonl" for i in range(n_parts)]
    for i, name in enumerate(names):
        if (part_dir / f"{i:05d}.jsonl").exists():
            os.replace(part_dir / f"{i:05d}.jsonl", out / name)
    for stale in out.glob("part-*.jsonl"):  # from an earlier, larger output
        if stale.name not in names:
            stale.unlink()
    for stale in ("train.bin", "val.bin"):  # an earlier --output=bins here
        (out / stale).unlink(missing_ok=True)
    return dict(documents=counts["train"], files={name: (out / name).stat().st_size for name in names})


def summary(meta: dict) -> str:
    if meta.get("output") == "jsonl":
        return (f"{meta['documents']:,} documents ({meta['document_bytes'] / 1e6:.1f} MB) "
                f"in {len(meta['files'])} JSONL files")
    return (f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens from "
            f"{meta['train_documents'] + meta['val_documents']:,} documents ({meta['document_bytes'] / 1e6:.1f} MB)")


def ensure_prepared(name: str = "local_python", quiet: bool = False) -> Path:
    """The folder of the default local corpus, prepared first if it isn't yet (or is stale):
    what train.py's bare run trains on."""
    cfg = SimpleNamespace(**{**DEFAULTS, "name": name})
    prepare(cfg, quiet=quiet)
    return output_dir(cfg, name)


def main():
    prepare(parse_settings(DEFAULTS, __doc__))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill stops the workers too, as Ctrl-C does
    run(main)
