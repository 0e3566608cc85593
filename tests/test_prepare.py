"""data/prepare.py on small corpora built here: what is skipped and counted, that the
bins decode back to exactly the kept documents, the stable split, reruns and resumes."""

import errno
import glob
import json
import os
import re
import shutil
import signal
import contextlib
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import at_work
from config import UserError
import tokenizer
from data import prepare
from tokenizer import EOT, VOCAB_SIZE, decode, encode

ROOT = Path(__file__).resolve().parent.parent


def settings(tmp_path, **overrides):
    return SimpleNamespace(**{**prepare.DEFAULTS, "out_dir": str(tmp_path / "out"), "name": "corpus",
                              "workers": 1, **overrides})


def tokens(folder: Path, split: str) -> np.ndarray:
    return np.fromfile(folder / f"{split}.bin", dtype=np.uint16)


def documents(ids: np.ndarray) -> list[str]:
    """The texts between EOTs; every document must end with one."""
    assert len(ids) == 0 or ids[-1] == EOT
    ends = np.flatnonzero(ids == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [decode(ids[s:e]) for s, e in zip(starts, ends)]


def write_tree(root: Path, files: dict) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


A = "def add(a, b):\n    return a + b\n"
B = 'text = "<|endoftext|> stays text"  # ünïcode\n\tif x:\n\t\tpass\n'


def test_local_source_skips_counts_and_decodes_back(tmp_path):
    src = write_tree(tmp_path / "src", {
        "a.py": A,
        "pkg/b.py": B,
        "pkg/copy_of_a.py": A,                    # exact duplicate
        "with_bom.py": b"\xef\xbb\xbf" + A.encode(),  # the same code behind a byte order mark
        "latin1.py": b"s = '\xe9t\xe9'\n",        # not UTF-8
        "nul.py": b"x = 1\x00\x00\n",             # binary
        "huge.py": "x = 1\n" * 400,               # over max_file_bytes
        "empty.py": "",
        "blank.py": "  \n\n",                     # whitespace only: empty too
        "pkg/__pycache__/cached.py": "cached = True\n",  # never read
        "notes.txt": "not python\n",              # never read
    })
    (src / "dangling.py").symlink_to(src / "missing.py")  # unreadable
    cfg = settings(tmp_path, inputs=str(src), val_fraction=0.0, max_file_bytes=1000)
    meta = prepare.prepare(cfg, quiet=True)

    out = tmp_path / "out" / "corpus"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["skipped"] == {"binary": 1, "empty": 2, "not_utf8": 1, "too_big": 1, "unreadable": 1}
    assert meta["duplicates"] == 2
    assert (meta["train_documents"], meta["val_documents"]) == (2, 0)
    assert (meta["dtype"], meta["eot"], meta["vocab_size"]) == ("uint16", EOT, VOCAB_SIZE)
    train = tokens(out, "train")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), 0)
    assert (out / "val.bin").stat().st_size == 0
    # sorted paths: a.py before pkg/b.py; the literal "<|endoftext|>" in b.py stays text
    assert train.tolist() == encode(A) + [EOT] + encode(B) + [EOT]
    assert documents(train) == [A, B]
    assert train.max() < VOCAB_SIZE
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_split_depends_on_content_only_and_output_is_deterministic(tmp_path):
    texts = [f"def f{i}():\n    return {i}\n" for i in range(40)]
    first = write_tree(tmp_path / "one", {f"m{i:02d}.py": t for i, t in enumerate(texts)})
    # the same documents under other names, folders and order
    second = write_tree(tmp_path / "two", {f"z/{99 - i}_x.py": t for i, t in enumerate(texts)})
    runs = {}
    for name, folder, workers in [("a", first, 1), ("b", first, 2), ("c", second, 1)]:
        prepare.prepare(settings(tmp_path, inputs=str(folder), name=name, val_fraction=0.5,
                                 workers=workers), quiet=True)
        out = tmp_path / "out" / name
        runs[name] = {split: (out / f"{split}.bin").read_bytes() for split in ("train", "val")}
    assert runs["a"] == runs["b"]  # byte-identical, in-process or on a pool
    val_a = set(documents(np.frombuffer(runs["a"]["val"], np.uint16)))
    val_c = set(documents(np.frombuffer(runs["c"]["val"], np.uint16)))
    assert val_a == val_c and 0 < len(val_a) < len(texts)
    assert set(documents(np.frombuffer(runs["c"]["train"], np.uint16))) == set(texts) - val_a


def test_rerun_is_skipped_and_a_changed_input_redoes(tmp_path, capsys):
    src = write_tree(tmp_path / "src", {"a.py": A, "b.py": B})
    cfg = settings(tmp_path, inputs=str(src), val_fraction=0.0)
    first = prepare.prepare(cfg)
    out = tmp_path / "out" / "corpus"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert prepare.prepare(cfg) == first
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    (src / "b.py").write_text(B + "print('more')\n")
    second = prepare.prepare(cfg, quiet=True)
    assert second["fingerprint"] != first["fingerprint"]
    assert documents(tokens(out, "train")) == [A, B + "print('more')\n"]

    third = prepare.prepare(settings(tmp_path, inputs=str(src), val_fraction=0.5), quiet=True)
    assert third["fingerprint"] != second["fingerprint"]


def record_encoding(monkeypatch, die_at: int = 0, error: type = KeyboardInterrupt) -> list:
    """Patch prepare.encode_docs to record each batch it is given, and to raise error at
    call number die_at (1 for the first; 0: never). Returns the list of batches."""
    calls, real = [], prepare.encode_docs

    def encode(batch):
        calls.append(batch)
        if len(calls) == die_at:
            raise error
        return real(batch)

    monkeypatch.setattr(prepare, "encode_docs", encode)
    return calls


def test_rerun_after_interruption_tokenizes_only_unfinished_parts(tmp_path, monkeypatch):
    texts = [f"x{i} = {i}\n" for i in range(6)]
    src = write_tree(tmp_path / "src", {f"m{i}.py": t for i, t in enumerate(texts)})
    monkeypatch.setattr(prepare, "PART_BYTES", 1)  # one document per part

    class Killed(Exception):
        pass

    record_encoding(monkeypatch, die_at=4, error=Killed)
    cfg = settings(tmp_path, inputs=str(src), val_fraction=0.0)
    with pytest.raises(Killed):
        prepare.prepare(cfg, quiet=True)
    out = tmp_path / "out" / "corpus"
    assert not (out / "meta.json").exists()
    assert len(list((out / "parts").glob("*.done"))) == 3

    calls = record_encoding(monkeypatch)
    meta = prepare.prepare(cfg, quiet=True)
    assert calls == [[texts[3]], [texts[4]], [texts[5]]]
    assert documents(tokens(out, "train")) == texts
    assert meta["train_documents"] == 6 and not (out / "parts").exists()


def full_disk(monkeypatch, name: str) -> None:
    """Writing a file called name, by write_atomic or concatenate, stops halfway with
    ENOSPC, as on a full disk."""
    real_write, real_copy = Path.write_bytes, shutil.copyfileobj

    def write_bytes(path, data):
        if path.name != name:
            return real_write(path, data)
        real_write(path, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def copyfileobj(src, dst, length=0):
        if Path(dst.name).name != name:
            return real_copy(src, dst, length)
        dst.write(src.read(2))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(shutil, "copyfileobj", copyfileobj)


def a_part_per_document(tmp_path, monkeypatch, n: int):
    """n one-line documents prepared a part each (texts, settings, out folder, encoder calls)."""
    texts = [f"x{i} = {i}\n" for i in range(n)]
    src = write_tree(tmp_path / "src", {f"m{i}.py": t for i, t in enumerate(texts)})
    monkeypatch.setattr(prepare, "PART_BYTES", 1)
    calls = record_encoding(monkeypatch)
    return texts, settings(tmp_path, inputs=str(src), val_fraction=0.0), tmp_path / "out" / "corpus", calls


def test_a_full_disk_is_one_line_leaves_no_tmp_and_a_rerun_resumes(tmp_path, monkeypatch):
    texts, cfg, out, calls = a_part_per_document(tmp_path, monkeypatch, 3)
    for full in (out / "parts" / "00001.train.bin", out / "train.bin"):  # tokenizing, then joining the parts
        with monkeypatch.context() as m, pytest.raises(UserError) as e:
            full_disk(m, full.name + ".tmp")
            prepare.prepare(cfg, quiet=True)
        assert re.fullmatch(rf"cannot write {re.escape(str(full))}: No space left on device "
                            rf"\(\d+\.\d GiB free there\)", str(e.value))
        assert not list(out.rglob("*.tmp"))  # its space is free again
    prepare.prepare(cfg, quiet=True)
    assert calls == [[texts[0]], [texts[1]], [texts[1]], [texts[2]]]  # the finished parts were kept
    assert documents(tokens(out, "train")) == texts


def test_a_join_the_disk_cannot_hold_is_one_line_before_it_begins_and_a_rerun_resumes(tmp_path, monkeypatch):
    texts, cfg, out, calls = a_part_per_document(tmp_path, monkeypatch, 2)
    real = shutil.disk_usage
    with monkeypatch.context() as m, pytest.raises(UserError) as e:
        m.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10))  # the parts hold more
        prepare.prepare(cfg, quiet=True)
    assert re.fullmatch(rf"cannot write {re.escape(str(out / 'train.bin'))}: it takes 0.0 GiB, and 0.0 GiB "
                        rf"are free there \(the parts .*: free some space and rerun\)", str(e.value))
    assert not list(out.glob("*.bin*"))  # not begun
    prepare.prepare(cfg, quiet=True)
    assert calls == [[texts[0]], [texts[1]]]  # the finished parts were kept
    assert documents(tokens(out, "train")) == texts


def test_cli_full_disk_is_one_line_after_the_progress_bar_and_exit_2(tmp_path):
    src = write_tree(tmp_path / "src", {"a.py": A, "b.py": B})
    full = ("import errno, os, pathlib, runpy, sys\n"
            "def write_bytes(path, data):\n"
            "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "pathlib.Path.write_bytes = write_bytes\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", full, "data/prepare.py", f"--inputs={src}",
                             f"--out_dir={tmp_path / 'out'}", "--workers=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(r"\nerror: cannot write \S+00000.train.bin: No space left on device \(.*\)\n$", result.stderr)


def test_jsonl_source_skips_bad_lines(tmp_path):
    good = {"id": 1, "text": A}
    lines = [
        json.dumps(good).encode(),
        b"{not json",
        b"[" * 100_000,                           # nested past what json parses
        b"",                                      # blank lines hold no document: not counted
        b" \t\r",
        b"[1, 2]",                                # not an object
        "{\"text\": \"caf\xe9\"}".encode("latin-1"),  # not UTF-8: not_utf8, not bad_json
        json.dumps({"id": 2}).encode(),           # no text
        json.dumps({"text": 5}).encode(),         # text not a string
        b'{"text": "\\ud800"}',                   # a lone surrogate: not UTF-8
        json.dumps({"text": ""}).encode(),        # empty
        json.dumps({"text": "a\u0000b"}).encode(),  # binary
        json.dumps({"id": 3, "text": A}).encode(),  # duplicate text
    ]
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "books_1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "synth" / "books_2.jsonl").write_text(json.dumps({"text": B}) + "\n")
    cfg = settings(tmp_path, source="jsonl", name="", val_fraction=0.0,
                   inputs=str(tmp_path / "synth" / "books_*.jsonl"))
    meta = prepare.prepare(cfg, quiet=True)
    out = tmp_path / "out" / "books_1"  # default name: the first file's
    assert meta["skipped"] == {"bad_json": 3, "binary": 1, "empty": 1, "no_text": 2, "not_utf8": 2}
    assert meta["duplicates"] == 1
    assert documents(tokens(out, "train")) == [A, B]
    files = sorted((tmp_path / "synth").iterdir())
    read = [n for _, n in prepare.parts(prepare.jsonl_items(files, cfg.max_file_bytes), cfg, Counter(), Counter())]
    assert sum(read) == sum(f.stat().st_size for f in files)  # blank lines too: the progress bar gets to its end


def test_a_jsonl_line_too_long_for_max_file_bytes_is_neither_held_nor_parsed(tmp_path, monkeypatch):
    """A JSON array of 175 MB on one line took 1.5 GB to be skipped as bad_json."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x = 1\n" * 50_000}) + "\n" + json.dumps({"text": A}))
    (tmp_path / "b.json").write_text(json.dumps([{"text": B}] * 20_000))  # JSON, not JSON lines
    parsed, real = [], json.loads

    def loads(line, **kwargs):
        parsed.append(len(line))
        return real(line, **kwargs)
    monkeypatch.setattr(json, "loads", loads)
    meta = prepare.prepare(settings(tmp_path, source="jsonl", inputs=f"{tmp_path}/a.jsonl,{tmp_path}/b.json",
                                    max_file_bytes=1000, val_fraction=0.0), quiet=True)
    assert meta["skipped"] == {"json_array": 1, "too_big": 1}
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == [A]
    assert max(parsed) < 1000  # only A's line


def test_a_small_corpus_always_gets_a_val_document(tmp_path):
    """Where the hash gives val nothing (few documents), val gets train's last one."""
    docs = [f"x_{i} = {i}\n" for i in range(5)]
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = settings(tmp_path, source="jsonl", inputs=str(tmp_path / "small.jsonl"), val_fraction=1e-9)
    meta = prepare.prepare(cfg, quiet=True)
    out = tmp_path / "out" / "corpus"
    train, val = documents(tokens(out, "train")), documents(tokens(out, "val"))
    assert train == docs[:-1] and val == [docs[-1]]
    assert (meta["train_documents"], meta["val_documents"]) == (4, 1)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(tokens(out, "train")), len(tokens(out, "val")))


def test_hf_source_through_a_stand_in_datasets_package(tmp_path, monkeypatch):
    asked = {}

    def load_dataset(name, config, split, data_dir, streaming):
        asked.update(name=name, config=config, split=split, data_dir=data_dir, streaming=streaming)
        return iter([{"content": A}, {"content": None}, {"content": A}, {"content": B}, {"content": "c = 3\n"}])

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    meta = prepare.prepare(settings(tmp_path, source="hf", val_fraction=0.0, max_docs=2), quiet=True)
    assert asked == dict(name="bigcode/the-stack-dedup", config=None, split="train",
                         data_dir="data/python", streaming=True)
    assert (meta["skipped"], meta["duplicates"], meta["train_documents"]) == ({"no_text": 1}, 1, 2)
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == [A, B]

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(UserError, match="pip install datasets"):
        prepare.prepare(settings(tmp_path, source="hf", name="other"), quiet=True)
    assert not (tmp_path / "out" / "other").exists()

    def dropped(name, config, split, data_dir, streaming):  # the network gone mid-stream: was a traceback
        yield from ({"content": A}, {"content": B})
        raise ConnectionError("Read timed out.\n(and more)")
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=dropped))
    with pytest.raises(UserError, match=r"^reading bigcode/the-stack-dedup failed after row 1: ConnectionError: "
                                        r"Read timed out\.; rerun to go on from the finished parts$"):
        prepare.prepare(settings(tmp_path, source="hf", name="dropped"), quiet=True)


def test_a_wrong_hf_text_field_is_one_line_before_the_dataset_is_streamed(tmp_path, monkeypatch):
    read = []

    def load_dataset(name, config, split, data_dir, streaming):
        for i in range(1000):  # The Stack's millions: hours of streaming, every row skipped
            read.append(i)
            yield {"content": f"x = {i}\n", "max_stars_repo_path": f"r/{i}.py"}

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match="^--hf_text_field=text is no field of bigcode/the-stack-dedup, "
                                        "whose rows have: content, max_stars_repo_path$"):
        prepare.prepare(settings(tmp_path, source="hf", hf_text_field="text"), quiet=True)
    assert read == [0] and not (tmp_path / "out" / "corpus").exists()


def test_user_errors_leave_nothing_that_looks_complete(tmp_path):
    only_empty = write_tree(tmp_path / "src", {"__init__.py": "", "b.py": "\n"})
    with pytest.raises(UserError, match="no usable documents"):
        prepare.prepare(settings(tmp_path, inputs=str(only_empty)), quiet=True)
    assert not (tmp_path / "out" / "corpus").exists()

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        prepare.prepare(settings(tmp_path, inputs=str(write_tree(tmp_path / "ok", {"a.py": A})),
                                 out_dir=str(tmp_path / "a_file")), quiet=True)
    for bad, message in [(dict(source="nope"), "unknown --source"),
                         (dict(inputs=str(tmp_path / "missing")), "no such file"),
                         (dict(val_fraction=1.0), "val_fraction")]:
        with pytest.raises(UserError, match=message):
            prepare.prepare(settings(tmp_path, **bad), quiet=True)


def test_check_writable_tries_for_real_and_creates_nothing(tmp_path):
    prepare.check_writable(tmp_path / "new" / "deeper" / "out.jsonl")
    kept = tmp_path / "kept.jsonl"
    kept.write_text("as it was\n")
    prepare.check_writable(kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl"] and kept.read_text() == "as it was\n"
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    os.mkfifo(tmp_path / "fifo")
    for path, reason in [(tmp_path, "it is a directory"), (kept / "x" / "y.jsonl", "kept.jsonl is a file"),
                         (Path("/proc/phi1-out.jsonl"), "cannot write /proc/phi1-out.jsonl: "),  # even as root
                         (tmp_path / "loop1", "Too many levels of symbolic links"),
                         (tmp_path / "loop1" / "f.npz", "Too many levels of symbolic links"),
                         (tmp_path / "fifo", "it is a FIFO"),  # its open would wait for a reader
                         (Path("/dev/null"), "it is not a regular file")]:  # synth.py's report went into /dev
        with pytest.raises(UserError, match=reason):
            prepare.check_writable(path)


def test_a_failed_rerun_leaves_the_prepared_dataset_whole(tmp_path, monkeypatch):
    cfg = settings(tmp_path, inputs=str(write_tree(tmp_path / "ok", {"a.py": A, "b.py": B})))
    meta = prepare.prepare(cfg, quiet=True)
    out = tmp_path / "out" / "corpus"
    before = {name: (out / name).read_bytes() for name in ("meta.json", "train.bin", "val.bin")}

    only_empty = write_tree(tmp_path / "empty", {"c.py": "\n"})
    with pytest.raises(UserError, match="no usable documents"):
        prepare.prepare(settings(tmp_path, inputs=str(only_empty)), quiet=True)

    def offline():
        raise UserError("cannot load tiktoken's r50k_base BPE file")
    monkeypatch.setattr(tokenizer, "_bpe", offline)  # offline without a copy of the BPE file
    with pytest.raises(UserError, match="r50k_base"):
        prepare.prepare(settings(tmp_path, inputs=str(write_tree(tmp_path / "new", {"d.py": A + A}))),
                        quiet=True)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / "parts").exists()
    monkeypatch.undo()
    assert prepare.finished(out, meta["fingerprint"]) == meta


def test_one_run_at_a_time_prepares_a_folder(tmp_path):
    """Two runs on one --name wrote one parts folder, and the one that finished first had
    its bins and meta.json removed by the other."""
    cfg = settings(tmp_path, inputs=str(write_tree(tmp_path / "ok", {"a.py": A, "b.py": B})))
    meta = prepare.prepare(cfg, quiet=True)
    out = tmp_path / "out" / "corpus"
    before = {name: (out / name).read_bytes() for name in ("meta.json", "train.bin", "val.bin")}
    other = settings(tmp_path, inputs=str(write_tree(tmp_path / "new", {"c.py": A + A})))
    with prepare.run_lock(out, "held by the test"):  # the other run, still at work
        with pytest.raises(UserError, match=r"^another run is preparing .*corpus: wait for it, stop it, or use "
                                            r"another --name$"):
            prepare.prepare(other, quiet=True)
        assert {name: (out / name).read_bytes() for name in before} == before
        assert not (out / "parts").exists()
        assert prepare.prepare(cfg, quiet=True) == meta  # a finished dataset is read, not written: no wait
    assert prepare.prepare(other, quiet=True)["fingerprint"] != meta["fingerprint"]


def test_a_lock_file_removed_as_it_was_taken_is_taken_anew(tmp_path, monkeypatch):
    """A lock file goes with the run that held it: a run that opened it just before then
    would hold a lock on a removed file, which keeps no other run out."""
    import fcntl
    lock, real_flock = tmp_path / "x.lock", fcntl.flock

    def the_run_before_ends_first(fd, operation):
        monkeypatch.setattr(fcntl, "flock", real_flock)
        lock.unlink()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", the_run_before_ends_first)
    with prepare.run_lock(lock, "busy", remove=True):
        assert lock.exists()
        with pytest.raises(UserError, match="^busy$"):
            with prepare.run_lock(lock, "busy", remove=True):
                pass
    assert not lock.exists()


def test_a_folder_that_cannot_be_locked_is_prepared_with_a_warning(tmp_path, monkeypatch, capsys):
    """On a file system without locks (ENOLCK on some NFS mounts) flock's error was a traceback."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    meta = prepare.prepare(settings(tmp_path, inputs=str(write_tree(tmp_path / "ok", {"a.py": A, "b.py": B}))),
                           quiet=True)
    assert meta["train_tokens"] + meta["val_tokens"] > 0
    assert "warning: cannot lock" in capsys.readouterr().err


def test_appender_keeps_records_that_utf8_cannot_spell(tmp_path):
    path = tmp_path / "records.jsonl"
    records = [{"answer": "lone \ud800 surrogate"}, {"text": "ünïcode ✓"}]
    writer = prepare.Appender(path)
    for record in records:
        writer.write(record)
    writer.close()
    assert list(prepare.read_jsonl(path)) == records
    assert "ünïcode ✓" in path.read_text(encoding="utf-8")  # readable text stays unescaped


def test_the_fingerprint_covers_the_tokenizer_code(tmp_path, monkeypatch):
    cfg = settings(tmp_path)
    first = prepare.fingerprint(cfg, ["a.py"])
    assert prepare.fingerprint(cfg, ["a.py"]) == first
    changed = tmp_path / "root"
    changed.mkdir()
    (changed / "tokenizer.py").write_text((ROOT / "tokenizer.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(prepare, "ROOT", changed)
    assert prepare.fingerprint(cfg, ["a.py"]) != first


def test_cli_missing_jsonl_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "data/prepare.py", "--source=jsonl", f"--inputs={tmp_path / 'missing.jsonl'}",
         f"--out_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "missing.jsonl" in result.stderr
    assert not out.exists()


def test_ensure_prepared_prepares_once_and_returns_the_folder(tmp_path, monkeypatch):
    src = write_tree(tmp_path / "src", {f"m{i}.py": f"y = {i}\n" for i in range(30)})
    monkeypatch.setattr(prepare, "DEFAULTS", {**prepare.DEFAULTS, "inputs": str(src),
                                              "out_dir": str(tmp_path), "val_fraction": 0.3})
    folder = prepare.ensure_prepared("mini", quiet=True)
    assert folder == tmp_path / "mini" and (folder / "meta.json").exists()
    assert prepare.ensure_prepared("mini", quiet=True) == folder
    assert len(tokens(folder, "train")) and len(tokens(folder, "val"))


def test_interpreter_roots_hold_the_standard_library():
    roots = prepare.interpreter_roots()
    assert any((root / "os.py").is_file() for root in roots)
    assert all(not a.is_relative_to(b) for a in roots for b in roots if a != b)


def test_expand_names_each_file_once_however_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("{}\n")
    assert prepare.expand(f"a.jsonl,{tmp_path / 'a.jsonl'},./a.jsonl,*.jsonl") == [Path("a.jsonl")]
    (tmp_path / "ex[v2].jsonl").write_text("{}\n")  # a name that reads as a glob: the file, not "no match"
    assert prepare.expand("ex[v2].jsonl") == [Path("ex[v2].jsonl")]
    with pytest.raises(UserError, match="^--corpus is needed"):
        prepare.expand(" , ", "--corpus")


def test_jsonl_output_holds_the_kept_documents_with_their_ids_for_filter(tmp_path, monkeypatch):
    """--output=jsonl: the documents filter.py scores, checked and deduplicated like the bins'."""
    import filter
    src = write_tree(tmp_path / "src", {"a.py": A, "b.py": B, "copy_of_a.py": A, "nul.py": b"x\x00\n"})
    cfg = settings(tmp_path, inputs=str(src), output="jsonl", val_fraction=0.5)
    meta = prepare.prepare(cfg, quiet=True)
    out = tmp_path / "out" / "corpus"
    files = sorted(out.glob("part-*.jsonl"))
    assert [f.name for f in files] == ["part-00000.jsonl"] and not (out / "train.bin").exists()
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert records == [{"id": str(src / "a.py"), "text": A}, {"id": str(src / "b.py"), "text": B}]  # no val
    assert (meta["documents"], meta["duplicates"], meta["skipped"]) == (2, 1, {"binary": 1})
    docs = list(filter.documents(files, filter.Counter()))
    assert [(doc_id, text) for _, doc_id, text, _ in docs] == [(r["id"], r["text"]) for r in records]
    assert prepare.prepare(cfg, quiet=True) == meta  # done: nothing to do

    # a JSONL source keeps a record's own id, else names it by path:line as filter.py would
    (tmp_path / "web.jsonl").write_text(json.dumps({"id": "x/1", "text": A}) + "\n" + json.dumps({"text": B}) + "\n")
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "web.jsonl"), output="jsonl"),
                    quiet=True)
    ids = [json.loads(line)["id"] for line in (out / "part-00000.jsonl").read_text().splitlines()]
    assert ids == ["x/1", f"{(tmp_path / 'web.jsonl').resolve()}:2"]

    # killed after moving its files but before meta.json: the rerun finishes the same output
    real = prepare.write_atomic

    def killed_at_meta(path, data):
        if path.name == "meta.json":
            raise KeyboardInterrupt
        real(path, data)
    monkeypatch.setattr(prepare, "write_atomic", killed_at_meta)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg, quiet=True)
    assert not (out / "meta.json").exists() and not list((out / "parts").glob("*.jsonl"))
    monkeypatch.undo()
    assert prepare.prepare(cfg, quiet=True) == meta
    assert [json.loads(line) for line in files[0].read_text().splitlines()] == records

    # killed while removing its parts after meta.json: the next run finds them and removes them
    (out / "parts").mkdir()
    (out / "parts" / "00000.done").write_bytes(b"")
    assert prepare.prepare(cfg, quiet=True) == meta and not (out / "parts").exists()

    with pytest.raises(UserError, match="--output must be bins or jsonl"):
        prepare.prepare(settings(tmp_path, inputs=str(src), output="npy"), quiet=True)


def test_jsonl_and_bins_outputs_never_mix(tmp_path, capsys):
    import train
    src = write_tree(tmp_path / "src", {"a.py": A, "b.py": B})
    (tmp_path / "odd.jsonl").write_text(json.dumps({"id": "\ud800", "text": A}) + "\n")  # a lone surrogate in an id
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "odd.jsonl"), name="", output="jsonl"),
                    quiet=True)
    odd = tmp_path / "out" / "odd_jsonl"  # not the bins' default folder
    assert json.loads((odd / "part-00000.jsonl").read_text())["id"] == "\\ud800"  # escaped: filter.py keeps it

    out = tmp_path / "out" / "corpus"
    prepare.prepare(settings(tmp_path, inputs=str(src)), quiet=True)
    prepare.prepare(settings(tmp_path, inputs=str(src), output="jsonl"), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "part-00000.jsonl"]
    with pytest.raises(UserError, match="holds JSONL documents"):
        train.Mixture(str(out), 16, 51200, prepare_default=False)
    capsys.readouterr()
    prepare.prepare(settings(tmp_path, inputs=str(src)))
    said = capsys.readouterr().out
    assert "holds JSONL documents from an earlier run: this run replaces them with token bins" in said
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    train.Mixture(str(out), 16, 51200, prepare_default=False)


def test_a_file_named_in_inputs_is_read_and_max_file_bytes_itself_is_not_too_big(tmp_path):
    src = write_tree(tmp_path / "src", {"a.py": A, "over.py": A + "#"})
    write_tree(tmp_path / "bin", {"tool": "z = 1\n"})  # a script without .py, named on its own
    cfg = settings(tmp_path, inputs=f"{src},{tmp_path / 'bin' / 'tool'}", val_fraction=0.0,
                   max_file_bytes=len(A.encode()))
    meta = prepare.prepare(cfg, quiet=True)
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == ["z = 1\n", A]
    assert meta["skipped"] == {"too_big": 1}
    docs = tmp_path / "docs.jsonl"  # documents of a JSONL file: the same limit
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in (A, A + "#")))
    meta = prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(docs), val_fraction=0.0, name="docs",
                                    max_file_bytes=len(A.encode())), quiet=True)
    assert meta["train_documents"] == 1 and meta["skipped"] == {"too_big": 1}


def test_the_seed_picks_another_val_set_of_about_val_fraction(tmp_path):
    texts = [f"v{i} = {i}\n" for i in range(400)]
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    vals = []
    for seed in (0, 1):
        cfg = settings(tmp_path, source="jsonl", inputs=str(tmp_path / "many.jsonl"), name=f"s{seed}",
                       val_fraction=0.25, seed=seed)
        meta = prepare.prepare(cfg, quiet=True)
        val = documents(tokens(tmp_path / "out" / f"s{seed}", "val"))
        assert 60 <= len(val) <= 140 and meta["val_documents"] == len(val)  # 100 expected; the hash is fixed
        vals.append(set(val))
    assert vals[0] != vals[1]


def test_jsonl_output_keeps_every_document_whatever_val_fraction(tmp_path):
    texts = [f"w{i} = {i}\n" for i in range(10)]
    src = write_tree(tmp_path / "src", {f"m{i}.py": t for i, t in enumerate(texts)})
    meta = prepare.prepare(settings(tmp_path, inputs=str(src), output="jsonl", val_fraction=0.9), quiet=True)
    lines = (tmp_path / "out" / "corpus" / "part-00000.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == texts and meta["documents"] == 10


def test_max_bytes_stops_at_the_document_that_reaches_it(tmp_path):
    docs = [f"x_{i} = {i}\n" for i in range(5)]  # 8 bytes each
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "d.jsonl"),
                                    val_fraction=0.0, max_bytes=16), quiet=True)
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == docs[:2]
    assert meta["document_bytes"] == 16


@pytest.mark.parametrize("source", ["local", "jsonl"])
def test_an_edit_that_keeps_the_size_or_a_chmod_redoes_the_run_and_a_copy_does_not(tmp_path, source):
    if source == "local":
        path = write_tree(tmp_path / "src", {"a.py": "x = 1\n"}) / "a.py"
        cfg = settings(tmp_path, inputs=str(path.parent), val_fraction=0.0)
    else:
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps({"text": "x = 1\n"}) + "\n")
        cfg = settings(tmp_path, source="jsonl", inputs=str(path), val_fraction=0.0)
    prepare.prepare(cfg, quiet=True)
    before = path.stat()
    path.write_text(path.read_text().replace("x = 1", "x = 2"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a coarse clock may not tick
    prepare.prepare(cfg, quiet=True)
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == ["x = 2\n"]
    listed = prepare.open_source(cfg).listing
    path.chmod(0o600)  # a chmod, as one that makes a file skipped as unreadable readable
    assert prepare.open_source(cfg).listing != listed
    listed = prepare.open_source(cfg).listing
    copy = path.with_name("copy")  # cp -a: the ctime changes, not the mtime nor the mode
    shutil.copy2(path, copy)
    os.replace(copy, path)
    assert prepare.open_source(cfg).listing == listed


def test_the_fingerprint_covers_every_setting_that_matters_and_this_file(tmp_path, monkeypatch):
    cfg = settings(tmp_path)
    first = prepare.fingerprint(cfg, [])
    for key, value in prepare.DEFAULTS.items():
        other = value + 1 if isinstance(value, (int, float)) else value + "x"
        changed = prepare.fingerprint(SimpleNamespace(**{**vars(cfg), key: other}), [])
        assert (changed == first) == (key in ("name", "out_dir", "workers", "inputs")), key  # inputs: by the listing
    copy = tmp_path / "prepare.py"
    copy.write_text(Path(prepare.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(prepare, "__file__", str(copy))
    assert prepare.fingerprint(cfg, []) != first


def test_a_truncated_bin_is_not_taken_for_a_prepared_one(tmp_path):
    cfg = settings(tmp_path, inputs=str(write_tree(tmp_path / "src", {"a.py": A, "b.py": B})), val_fraction=0.0)
    prepare.prepare(cfg, quiet=True)
    out = tmp_path / "out" / "corpus"
    whole = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(whole[:-2])
    prepare.prepare(cfg, quiet=True)
    assert (out / "train.bin").read_bytes() == whole


def test_parts_of_an_interrupted_run_on_other_inputs_are_not_reused(tmp_path, monkeypatch):
    src = write_tree(tmp_path / "src", {f"m{i}.py": f"x{i} = {i}\n" for i in range(3)})
    monkeypatch.setattr(prepare, "PART_BYTES", 1)  # one document per part
    record_encoding(monkeypatch, die_at=3)
    cfg = settings(tmp_path, inputs=str(src), val_fraction=0.0)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg, quiet=True)
    record_encoding(monkeypatch)
    (src / "m0.py").write_text("x0 = 'edited'\n")  # part 0 was done with the old text
    prepare.prepare(cfg, quiet=True)
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == ["x0 = 'edited'\n", "x1 = 1\n", "x2 = 2\n"]


def test_read_jsonl_skips_blank_lines_and_a_torn_last_line_only(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n{"c": ')
    assert list(prepare.read_jsonl(path)) == [{"a": 1}, {"b": 2}]
    path.write_bytes(b'{"a": 1}\n{"c": \n{"b": 2}\n')
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        list(prepare.read_jsonl(path))
    path.write_bytes(b'{"a": 1}\n' + b"[" * 100_000 + b'\n{"b": 2}\n')  # nested past what json parses
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        list(prepare.read_jsonl(path))


def test_appender_cuts_a_torn_last_line_and_ends_a_whole_one(tmp_path):
    path = tmp_path / "r.jsonl"
    for before, after in [(b'{"a": 1}\n{"b": ', b'{"a": 1}\n{"c": 3}\n'),
                          (b'{"a": 1}\n{"b": 2}', b'{"a": 1}\n{"b": 2}\n{"c": 3}\n'),
                          (b'{"b": ', b'{"c": 3}\n'),
                          (b'{"a": 1}\n' + b"[" * 100_000, b'{"a": 1}\n{"c": 3}\n')]:
        path.write_bytes(before)
        writer = prepare.Appender(path)
        writer.write({"c": 3})
        writer.close()
        assert path.read_bytes() == after


def test_an_appender_write_that_fails_is_one_user_error_and_the_next_run_cuts_what_it_tore(tmp_path):
    path = tmp_path / "r.jsonl"
    code = ("import resource, sys\nfrom pathlib import Path\nfrom config import UserError\n"
            "from data.prepare import Appender\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # a disk that fills at 100 bytes\n"
            "writer = Appender(Path(sys.argv[1]))\ntry:\n    for i in range(5):\n"
            "        writer.write({'i': i, 'text': 'x' * 20})  # 41 bytes a line\nexcept UserError as e:\n    print(e)\n"
            "finally:\n    writer.close()  # the line still buffered fails no second time\n")
    result = run_isolated(code, str(path))
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout == f"cannot write {path}: File too large\n"
    assert path.stat().st_size == 100  # two whole lines and a torn one
    writer = prepare.Appender(path)
    writer.write({"i": 2})
    writer.close()
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_an_appender_whose_write_failed_has_closed_its_file(tmp_path, monkeypatch):
    """Left open, the file kept its descriptor and its buffered line, for the garbage
    collector to flush into the file later."""
    opened = []
    monkeypatch.setattr(prepare.Appender, "open", lambda self: opened.append(open("/dev/full", "wb")) or opened[-1])
    writer = prepare.Appender(tmp_path / "r.jsonl")
    with pytest.raises(UserError, match="No space left on device"):
        writer.write({"a": 1})
    assert opened[0].closed
    writer.close()  # nothing left to fail


def test_move_document_searches_only_its_window_and_starves_neither_side(tmp_path):
    a, b, c = encode("x = 1\n"), encode("y = [1, 2, 3]\n"), encode("z = 3\n")
    ids = np.array(a + [EOT] + b + [EOT] + c + [EOT], dtype=np.uint16)
    train, val = tmp_path / "train.bin", tmp_path / "val.bin"
    train.write_bytes(ids.tobytes())
    # the window holds the last document and the EOT before it, not the file's start
    assert prepare.move_document(train, val, window=len(c) + 2) == len(c) + 1
    assert documents(tokens(tmp_path, "train")) == ["x = 1\n", "y = [1, 2, 3]\n"]
    assert documents(tokens(tmp_path, "val")) == ["z = 3\n"]
    # a last document longer than the window is left where it is
    assert prepare.move_document(train, tmp_path / "other.bin", window=len(b)) == 0
    assert documents(tokens(tmp_path, "train")) == ["x = 1\n", "y = [1, 2, 3]\n"]
    assert not (tmp_path / "other.bin").exists()

    # a last document bigger than the rest stays: the one before it goes, and the last moves up
    big = "data = " + repr(list(range(300))) + "\n"
    train.write_bytes(np.array(a + [EOT] + b + [EOT] + encode(big) + [EOT], dtype=np.uint16).tobytes())
    assert prepare.move_document(train, val) == len(b) + 1
    assert documents(tokens(tmp_path, "train")) == ["x = 1\n", big]
    assert documents(tokens(tmp_path, "val")) == ["y = [1, 2, 3]\n"]
    # the only document moves whole (to an empty train.bin)
    assert prepare.move_document(val, train) == len(b) + 1
    assert documents(tokens(tmp_path, "train")) == ["y = [1, 2, 3]\n"] and val.stat().st_size == 0


def test_a_corpus_the_hash_puts_all_in_val_still_trains(tmp_path, capsys):
    """As an all-train corpus gets a val document, an all-val one gets a train document;
    one document goes to train, and the warning says why val.bin is empty."""
    docs = [f"x_{i} = {i}\n" for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "d.jsonl"),
                                    val_fraction=0.999999), quiet=True)
    out = tmp_path / "out" / "corpus"
    assert documents(tokens(out, "train")) == [docs[-1]] and documents(tokens(out, "val")) == docs[:-1]
    assert (meta["train_documents"], meta["val_documents"]) == (1, 2)

    for val_fraction in (0.999999, 0.01):  # the hash puts it in val, then in train
        (tmp_path / "one.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")
        meta = prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "one.jsonl"),
                                        val_fraction=val_fraction, name="one"))
        assert documents(tokens(tmp_path / "out" / "one", "train")) == [docs[0]]
        assert (meta["train_documents"], meta["val_documents"], meta["val_tokens"]) == (1, 0, 0)
        said = capsys.readouterr().out
        assert "val.bin is empty: the corpus's one document is in train.bin" in said
        assert "raise --val_fraction" not in said


def run_isolated(code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Python code in a process of its own, ended after timeout seconds and allowed 2 GiB
    (about 0.3 used): where the code under test could hang or fill the memory, the test
    fails instead. One BLAS thread: on many cores, their buffers alone could pass the limit."""
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit_memory,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})


def test_a_worker_whose_parent_died_before_it_started_ends_at_once():
    """The death signal is set in the worker: a main process killed between the fork and that
    left the worker working on alone, holding the run's lock (every rerun: "another run")."""
    code = ("import os\nfrom data.prepare import worker_signals\n"
            "worker_signals(os.getppid() + 1)\nprint('worked on', flush=True)\n")  # not its parent: gone
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "worked on" not in done.stdout
    code = code.replace("os.getppid() + 1", "os.getppid()")
    assert "worked on" in subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                         timeout=60).stdout


def test_pool_workers_die_with_a_main_process_killed_outright():
    code = ("import multiprocessing, os, time\nfrom data.prepare import worker_signals\n"
            "pool = multiprocessing.get_context('fork').Pool(2, worker_signals, (os.getpid(),))\n"
            "print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
            "pool.map_async(time.sleep, [60, 60])\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.kill()
    proc.wait()

    def state(pid: int) -> str | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None

    def alive():  # (a zombie waits for init to reap it: dead)
        return [pid for pid in workers if state(pid) not in (None, "Z")]
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = alive()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_a_tokenizer_process_that_dies_is_one_line_and_a_rerun_goes_on(tmp_path, monkeypatch):
    """A worker killed (out of memory, kill -9) once left the run waiting for its task for ever."""
    texts = [f"x{i} = {i}\n" for i in range(6)]  # 7 bytes each
    src = write_tree(tmp_path / "src", {f"m{i}.py": t for i, t in enumerate(texts)})
    code = ("import os, signal\nfrom config import run\nfrom data import prepare\n"
            "prepare.PART_BYTES, prepare.TASK_BYTES = 14, 1\n"  # two documents a part, one a task
            "real = prepare.encode_docs\n"
            "def encode_docs(texts):\n"
            "    if texts == ['x3 = 3\\n']:\n"  # in a worker of the second part's pool
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(texts)\n"
            "prepare.encode_docs = encode_docs\n"
            "run(prepare.main)\n")
    result = run_isolated(code, f"--inputs={src}", f"--out_dir={tmp_path / 'out'}", "--name=corpus",
                          "--val_fraction=0", "--workers=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.endswith("\nerror: a tokenizer process died (killed, or out of memory?): "
                                  "rerun to go on from the finished parts\n")

    monkeypatch.setattr(prepare, "PART_BYTES", 14)
    calls = record_encoding(monkeypatch)
    prepare.prepare(settings(tmp_path, inputs=str(src), val_fraction=0.0), quiet=True)
    assert calls == [texts[2:4], texts[4:]]  # the first part was finished
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == texts


def test_fifos_and_devices_are_skipped_not_waited_on_or_read_forever(tmp_path):
    src = write_tree(tmp_path / "src", {"a.py": A})
    (src / "b_zero.py").symlink_to("/dev/zero")  # its size says 0; reading it never ends
    os.mkfifo(src / "c_pipe.py")  # its open waits for a writer
    os.mkfifo(tmp_path / "named")  # a FIFO named in --inputs
    result = run_isolated("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                          "data/prepare.py", f"--inputs={src},{tmp_path / 'named'}", f"--out_dir={tmp_path / 'out'}",
                          "--name=corpus", "--workers=1", "--val_fraction=0")
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "corpus" / "meta.json").read_text())
    assert meta["skipped"] == {"special_file": 3} and meta["train_documents"] == 1
    # a JSONL input is named: one that is not a regular file is the user's to fix
    with pytest.raises(UserError, match="not a regular file: .*named"):
        prepare.expand(str(tmp_path / "named"))


def test_unlistable_folders_are_counted_and_folder_links_not_followed(tmp_path, monkeypatch):
    src = write_tree(tmp_path / "src", {"a.py": A, "locked/b.py": B})
    outside = write_tree(tmp_path / "outside", {"c.py": "c = 3\n", "d.py": "d = 4\n"})
    (src / "linked").symlink_to(outside)  # a folder link: not walked into
    (src / "d.py").symlink_to(outside / "d.py")  # a file link: read
    real = os.scandir

    def scandir(path="."):  # as for a user without the permission (the tests may run as root)
        if str(path) == str(src / "locked"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    meta = prepare.prepare(settings(tmp_path, inputs=str(src), val_fraction=0.0), quiet=True)
    assert meta["skipped"] == {"unreadable_folder": 1}
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == [A, "d = 4\n"]


def test_a_double_star_glob_goes_into_no_symlinked_folder(tmp_path, monkeypatch):
    loop = write_tree(tmp_path / "loop", {"a.jsonl": "", "sub/b.jsonl": ""})
    (loop / "l1").symlink_to(".")
    (loop / "l2").symlink_to(".")  # glob's ** would go round these two forever
    (loop / "ext").symlink_to(write_tree(tmp_path / "outside", {"o.jsonl": ""}))
    result = run_isolated("import json, sys; from data import prepare; "
                          "print(json.dumps([[str(p) for p in prepare.expand(a)] for a in sys.argv[1:]]))",
                          f"{loop}/**/*.jsonl", f"{loop}/ext/**/*.jsonl", timeout=20)
    assert result.returncode == 0, result.stderr[-2000:]
    # a link that the pattern spells out is followed
    assert json.loads(result.stdout) == [[str(loop / "a.jsonl"), str(loop / "sub" / "b.jsonl")],
                                         [str(loop / "ext" / "o.jsonl")]]

    # without links: the files glob.glob(recursive=True) finds, however the pattern is spelled
    write_tree(tmp_path / "plain" / "in", {"a.jsonl": "", "sub/b.jsonl": "", "sub/deep/c.jsonl": "", ".hid/h.jsonl": "",
                                           "sub/.h.jsonl": "", "x[1]/e.jsonl": "", "sub/deep/f.txt": ""})
    monkeypatch.chdir(tmp_path / "plain")
    for pattern in ["in/**/*.jsonl", "**/*.jsonl", "in/**", "in/**/deep/*", "i*/**/*/**/*.jsonl", "in/sub/**/c.*"]:
        files = sorted(filter(os.path.isfile, glob.glob(pattern, recursive=True)))
        assert sorted(filter(os.path.isfile, prepare.glob_files(pattern))) == files, pattern


def test_a_jsonl_id_of_null_is_no_id(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": None, "text": A}) + "\n" + json.dumps({"id": 0, "text": B}) + "\n")
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "d.jsonl"), output="jsonl"), quiet=True)
    lines = (tmp_path / "out" / "corpus" / "part-00000.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"{(tmp_path / 'd.jsonl').resolve()}:1", "0"]


def test_a_smaller_jsonl_output_removes_the_parts_it_no_longer_has(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PART_BYTES", 1)  # one document per part
    src = write_tree(tmp_path / "src", {f"m{i}.py": f"x{i} = {i}\n" for i in range(3)})
    prepare.prepare(settings(tmp_path, inputs=str(src), output="jsonl"), quiet=True)
    out = tmp_path / "out" / "corpus"
    assert len(list(out.glob("part-*.jsonl"))) == 3
    (src / "m1.py").unlink()
    (src / "m2.py").unlink()
    meta = prepare.prepare(settings(tmp_path, inputs=str(src), output="jsonl"), quiet=True)
    assert [p.name for p in out.glob("part-*.jsonl")] == ["part-00000.jsonl"] == list(meta["files"])


def test_settings_out_of_range_and_globs_that_match_nothing_are_user_errors(tmp_path):
    src = str(write_tree(tmp_path / "src", {"a.py": A}))
    for bad, message in [(dict(val_fraction=-0.1), "val_fraction"), (dict(max_file_bytes=0), "max_file_bytes"),
                         (dict(max_docs=-1), "max_docs")]:
        with pytest.raises(UserError, match=message):
            prepare.prepare(settings(tmp_path, inputs=src, **bad), quiet=True)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": A}) + "\n")
    with pytest.raises(UserError, match="no file matches"):
        prepare.expand(f"{tmp_path / 'a.jsonl'},{tmp_path / 'typo*.jsonl'}")
    assert not (tmp_path / "out").exists()


def test_an_already_prepared_rerun_keeps_the_parts_of_another_interrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PART_BYTES", 1)  # one document per part
    one = settings(tmp_path, inputs=str(write_tree(tmp_path / "one", {"a.py": A})), val_fraction=0.0)
    prepare.prepare(one, quiet=True)
    texts = [f"x{i} = {i}\n" for i in range(3)]
    two = settings(tmp_path, inputs=str(write_tree(tmp_path / "two", {f"m{i}.py": t for i, t in enumerate(texts)})),
                   val_fraction=0.0)
    record_encoding(monkeypatch, die_at=2)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(two, quiet=True)
    prepare.prepare(one, quiet=True)  # already prepared: the other run's part stays for its rerun
    calls = record_encoding(monkeypatch)
    prepare.prepare(two, quiet=True)
    assert calls == [[texts[1]], [texts[2]]]
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == texts


def test_a_run_on_other_inputs_of_the_same_name_says_it_replaces_the_dataset(tmp_path, capsys):
    first, second = tmp_path / "a" / "docs.jsonl", tmp_path / "b" / "docs.jsonl"
    for path, text in ((first, A), (second, B)):
        path.parent.mkdir()
        path.write_text(json.dumps({"text": text}) + "\n")
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(first), name=""))
    assert "replaces" not in capsys.readouterr().out
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(second), name=""))
    said = capsys.readouterr().out
    assert f"docs holds a dataset of other inputs ({first}): this run replaces it (another --name keeps both)" in said
    first.write_text(json.dumps({"text": A + B}) + "\n")
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(first), name=""))  # back: said again
    assert "other inputs" in capsys.readouterr().out
    first.write_text(json.dumps({"text": B + B}) + "\n")
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(first), name=""))  # the same input, edited
    assert "other inputs" not in capsys.readouterr().out


def test_many_tasks_on_a_pool_come_back_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TASK_BYTES", 1)  # one document per task: many tasks in flight at once
    texts = [f"t{i} = '{'x' * (i % 7 * 300)}'\n" for i in range(120)]  # uneven sizes: uneven finishing times
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "d.jsonl"), val_fraction=0.0,
                             workers=2), quiet=True)
    assert documents(tokens(tmp_path / "out" / "corpus", "train")) == texts


def test_tokenizer_processes_are_no_more_than_the_cores_or_the_tasks(tmp_path, monkeypatch):
    """--workers=100000 once forked thousands of processes."""
    sizes = []

    class Pool(prepare.ProcessPoolExecutor):
        def __init__(self, workers, *args, **kwargs):
            sizes.append(workers)
            super().__init__(workers, *args, **kwargs)

    monkeypatch.setattr(prepare, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # three cores
    monkeypatch.setattr(prepare, "TASK_BYTES", 1)  # a task a document
    for n in (5, 2):
        src = write_tree(tmp_path / f"src{n}", {f"m{i}.py": f"x{i} = {i}\n" for i in range(n)})
        prepare.prepare(settings(tmp_path, inputs=str(src), name=f"c{n}", val_fraction=0.0, workers=100_000),
                        quiet=True)
    assert sizes == [3, 2]


def test_a_local_source_with_inputs_gets_a_name_of_its_own(tmp_path, monkeypatch):
    """Not local_python, the corpus a bare train.py trains on, which it would replace."""
    src = write_tree(tmp_path / "src", {"a.py": A, "b.py": B})
    prepare.prepare(settings(tmp_path, inputs=str(src), name=""), quiet=True)
    assert (tmp_path / "out" / "local_src" / "meta.json").exists()
    assert prepare.open_source(settings(tmp_path, inputs=f"{src / 'a.py'},{src}", name="")).name == "local_a"
    monkeypatch.setattr(prepare, "interpreter_roots", lambda: [src])
    assert prepare.open_source(settings(tmp_path, name="")).name == "local_python"  # bare: as before


@pytest.mark.parametrize("source, setting", [("jsonl", "--hf_dataset=x"), ("local", "--hf_text_field=prompt"),
                                             ("hf", "--inputs=a.jsonl")])
def test_a_setting_of_another_source_is_refused_not_ignored(tmp_path, source, setting):
    """--source=jsonl --hf_text_field=prompt read the "text" field anyway, and called the
    documents without one no_text."""
    key, _, value = setting[2:].partition("=")
    with pytest.raises(UserError, match=f"^{setting.partition('=')[0]} is no setting of --source={source}$"):
        prepare.prepare(settings(tmp_path, source=source, **{key: value}), quiet=True)


@pytest.mark.parametrize("name", [".", "..", "/", "sub/.."])
def test_a_name_that_is_no_folder_of_its_own_is_refused(tmp_path, name):
    """--name=.. wrote train.bin, val.bin and meta.json into out_dir's parent (--name=/: into /)."""
    src = write_tree(tmp_path / "src", {"a.py": A, "b.py": B})
    with pytest.raises(UserError, match=f"--name={re.escape(name)} names no folder of its own"):
        prepare.prepare(settings(tmp_path, inputs=str(src), name=name), quiet=True)
    assert not list(tmp_path.glob("**/meta.json"))


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_ctrl_c_or_a_kill_stops_the_workers_without_tracebacks(tmp_path, how):
    line = "x = [" + ", ".join(map(str, range(400))) + "]\n"
    src = write_tree(tmp_path / "src", {f"m{i}.py": line * 10 + f"# {i}\n" for i in range(800)})  # 16 MB: seconds
    proc, workers = at_work(["data/prepare.py", f"--inputs={src}", f"--out_dir={tmp_path / 'out'}", "--workers=2"])
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: to its job's group (the workers have their own)
    else:
        proc.terminate()  # SIGTERM to the parent only, as kill and timeout do
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and stderr.endswith("\ninterrupted\n") and "Traceback" not in stderr
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def stopped_run(code: str, src: Path, out: Path) -> tuple[int, str]:
    """(exit status, stderr) of python -c code (a stop staged, then prepare.py's main) on src
    with 2 workers; killed with its workers after 60 s (a hang)."""
    proc = subprocess.Popen([sys.executable, "-c", code, f"--inputs={src}", f"--out_dir={out}", "--workers=2"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stderr = proc.communicate(timeout=60)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the old code's hang, and its workers
    return proc.returncode, stderr


def test_a_stop_while_the_pool_starts_ends_the_run(tmp_path):
    """A Ctrl-C between the workers' fork and the start of the pool's thread that ends them
    printed "interrupted", then the exit waited on the idle workers for ever, holding the lock."""
    src = write_tree(tmp_path / "src", {f"m{i}.py": f"x_{i} = {i}\n" for i in range(40)})
    code = ("import os, signal\nimport concurrent.futures.process as cfp\nfrom config import run\n"
            "from data import prepare\nprepare.TASK_BYTES = 10\nstart = cfp._ExecutorManagerThread.__init__\n"
            "def stopped_there(self, *args):\n    os.kill(os.getpid(), signal.SIGINT)\n    start(self, *args)\n"
            "cfp._ExecutorManagerThread.__init__ = stopped_there\nrun(prepare.main)\n")
    returncode, stderr = stopped_run(code, src, tmp_path / "out")
    assert returncode == 130 and stderr.endswith("\ninterrupted\n") and "Traceback" not in stderr


def test_a_stop_once_the_pool_has_queued_tasks_ends_the_run(tmp_path):
    """A stop once the pool's thread had queued tasks: the workers were killed under it, its
    broken-pool path raised on the futures map() had cancelled, and the exit waited for ever on
    a task stuck in the pipe to the dead workers (1 in ~20 SIGTERMs in CI)."""
    line = "x = [" + ", ".join(map(str, range(400))) + "]\n"
    src = write_tree(tmp_path / "src", {f"m{i}.py": line * 60 + f"# {i}\n" for i in range(40)})  # 4.8 MB: 5 tasks
    code = ("import time\nimport concurrent.futures._base as base\nfrom config import run\n"
            "from data import prepare\nresult = base.Future.result\n"
            "def stopped_there(self, timeout=None):  # Ctrl-C as map() waits on its first result\n"
            "    base.Future.result = result\n    time.sleep(0.3)  # the pool's thread queues tasks meanwhile\n"
            "    raise KeyboardInterrupt\nbase.Future.result = stopped_there\nrun(prepare.main)\n")
    returncode, stderr = stopped_run(code, src, tmp_path / "out")
    assert returncode == 130 and stderr.endswith("\ninterrupted\n") and "Traceback" not in stderr, stderr[-2000:]


def test_a_run_refuses_inputs_it_would_delete_or_overwrite(tmp_path):
    """Bins into the folder of their own JSONL input would delete it (and then find nothing
    on a rerun); files the run does not replace may lie there."""
    src = write_tree(tmp_path / "src", {"a.py": A, "b.py": B})
    prepare.prepare(settings(tmp_path, inputs=str(src), output="jsonl", name="web"), quiet=True)
    copy = tmp_path / "out" / "copy"
    shutil.copytree(tmp_path / "out" / "web", copy)
    for output in ("bins", "jsonl"):
        with pytest.raises(UserError, match="which this run would delete or overwrite"):
            prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(copy / "part-*.jsonl"), output=output,
                                     name="copy"), quiet=True)
    assert (copy / "part-00000.jsonl").is_file() and not (copy / "train.bin").exists()
    (copy / "parts").mkdir()  # the run's own work folder, which it removes
    shutil.copy(copy / "part-00000.jsonl", copy / "parts" / "mine.jsonl")
    with pytest.raises(UserError, match="which this run would delete or overwrite"):
        prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(copy / "parts" / "mine.jsonl"), name="copy"),
                        quiet=True)
    shutil.rmtree(copy / "parts")
    os.replace(copy / "part-00000.jsonl", copy / "notes.jsonl")  # not a name the run replaces
    meta = prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(copy / "notes.jsonl"), name="copy"),
                           quiet=True)
    assert meta["train_documents"] + meta["val_documents"] == 2 and (copy / "notes.jsonl").is_file()


@pytest.mark.parametrize("output", ["jsonl", "bins"])
def test_files_a_run_would_replace_in_a_folder_it_did_not_write_are_refused(tmp_path, output):
    src = write_tree(tmp_path / "src", {"a.py": A, "b.py": B})
    theirs = write_tree(tmp_path / "out" / "mine", {"part-00007.jsonl": '{"text": "x"}\n', "train.bin": b"ab"})
    with pytest.raises(UserError, match="holds part-00007.jsonl, train.bin but no meta.json"):
        prepare.prepare(settings(tmp_path, inputs=str(src), output=output, name="mine"), quiet=True)
    assert sorted(p.name for p in theirs.iterdir()) == ["part-00007.jsonl", "train.bin"]
    prepare.prepare(settings(tmp_path, inputs=str(src), output=output, name="ours"), quiet=True)  # ours: a rerun
    prepare.prepare(settings(tmp_path, inputs=str(src), output=output, name="ours", seed=5), quiet=True)  # replaces


def test_a_file_named_in_inputs_is_read_whatever_its_name_inside_a_folder_also_named(tmp_path):
    src = write_tree(tmp_path / "src", {"a.py": A, "tool": B, "notes.txt": "x = 3\n"})
    meta = prepare.prepare(settings(tmp_path, inputs=f"{src},{src / 'tool'}", output="jsonl"), quiet=True)
    assert meta["documents"] == 2  # a.py and tool: a walk takes .py files alone


def test_jsonl_ids_that_are_not_utf8_are_escaped_so_filter_keeps_them(tmp_path):
    """A document without an id in a file whose name is not UTF-8 was named by the raw path,
    and one whose id held a lone surrogate kept it: filter.py skipped both."""
    import filter
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / os.fsdecode(b"caf\xe9.jsonl")
    source.write_text(json.dumps({"text": A}) + "\n" + json.dumps({"text": B, "id": "x\ud800"}) + "\n")
    prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(source), output="jsonl", name="c"), quiet=True)
    skipped = filter.Counter()
    ids = [doc_id for _, doc_id, _, _ in filter.documents([tmp_path / "out" / "c" / "part-00000.jsonl"], skipped)]
    assert sorted(ids) == sorted([f"{tmp_path}/in/caf\\xe9.jsonl:1", "x\\ud800"]) and not skipped
    assert filter.document_id({}, source.resolve(), 1) == f"{tmp_path}/in/caf\\xe9.jsonl:1"  # as filter names it


def test_a_file_name_that_is_not_utf8_gives_an_id_filter_keeps(tmp_path):
    import filter
    src = tmp_path / "src"
    src.mkdir()
    (src / os.fsdecode(b"caf\xe9.py")).write_text(A)  # Python spells the name with a lone surrogate
    prepare.prepare(settings(tmp_path, inputs=str(src), output="jsonl"), quiet=True)
    part = tmp_path / "out" / "corpus" / "part-00000.jsonl"
    skipped = filter.Counter()
    assert [doc_id for _, doc_id, _, _ in filter.documents([part], skipped)] == [f"{src}/caf\\xe9.py"]
    assert not skipped


def test_the_same_inputs_spelled_otherwise_are_already_prepared(tmp_path, monkeypatch, capsys):
    """A path given relative or absolute, with a trailing comma or as a glob, names the same
    files: the rerun did everything again, saying the dataset was of other inputs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": A}) + "\n" + json.dumps({"text": B}) + "\n")
    write_tree(tmp_path / "src", {"a.py": A, "b.py": B})
    for source, spellings in (("jsonl", ["d.jsonl", str(tmp_path / "d.jsonl"), "d.jsonl,", "d.json?"]),
                              ("local", ["src", str(tmp_path / "src"), "src/", "src,src/a.py"])):
        first = prepare.prepare(settings(tmp_path, source=source, inputs=spellings[0], name=source), quiet=True)
        for inputs in spellings[1:]:
            assert prepare.prepare(settings(tmp_path, source=source, inputs=inputs, name=source)) == first
            said = capsys.readouterr().out
            assert "already prepared" in said and "other inputs" not in said


def test_a_jsonl_file_that_is_not_utf8_gives_no_garbled_documents(tmp_path):
    """json.loads of bytes guesses UTF-16 or -32 from the zero bytes: a UTF-16 file (what
    Windows PowerShell writes), cut into lines at its \\n bytes, gave every line after the
    first read shifted by a byte, and kept "代码 x = 1" as "ã丁砠x = 1"."""
    docs = [{"text": "first"}, {"text": "代码 x = 1"}, {"text": "plain"}]
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    (tmp_path / "u16.jsonl").write_bytes(lines.encode("utf-16"))
    with pytest.raises(UserError, match="no usable documents"):
        prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "u16.jsonl")), quiet=True)
    (tmp_path / "bom.jsonl").write_bytes(lines.encode("utf-8-sig"))  # a UTF-8 byte order mark is fine
    meta = prepare.prepare(settings(tmp_path, source="jsonl", inputs=str(tmp_path / "bom.jsonl"), output="jsonl",
                                    name="bom"), quiet=True)
    part = (tmp_path / "out" / "bom" / "part-00000.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in part] == [d["text"] for d in docs] and not meta["skipped"]
