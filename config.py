"""One way for every script to take its settings from the command line.

Each script keeps its defaults as a plain dict at the top of the file, one
commented line per setting:

    DEFAULTS = dict(
        batch_size=8,        # sequences per micro-step
        compile=False,       # torch.compile the model
    )

and calls `cfg = parse_settings(DEFAULTS, __doc__)` in main() (or
`cfg, args = parse_args(DEFAULTS, __doc__)`, where it takes arguments). On the
command line `--batch_size=16`, `--batch_size 16`, `--compile` (a bool set to
true) and `--compile=false` all work (`--compile false` and `--no-compile` are
errors that say `--compile=false`); values take the type of their default.
`--help` prints the script's docstring and every setting with its default and
its comment. Mistakes end with one line on stderr and exit status 2, through
`UserError` and `run()`, so no user ever sees a traceback for a typo.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import errno
import inspect
import io
import math
import os
import re
import signal
import stat
import sys
import time
from numbers import Real
from pathlib import Path
from types import SimpleNamespace


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit 2."""


def first_process() -> bool:
    """Whether this is torchrun's process 0, or the only process: where each process meets
    the same thing (a signal, the command line's mistakes), one says so."""
    return int(os.environ.get("RANK") or 0) == 0


def cache_dir() -> Path:
    """Where downloads are kept (hub weights, MBPP): $PHI1_CACHE, or ~/.cache/phi1 where it is
    unset or empty (an empty path would be the current folder)."""
    return Path(os.environ.get("PHI1_CACHE") or Path.home() / ".cache" / "phi1")


def file_stamp(path: Path) -> list[int] | None:
    """A file's size and modification time, from one stat (None where there is no file): what
    says it was written since it was read, without reading it (an edit that keeps both, as
    touch -r after it, goes unseen)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def run(main) -> None:
    """Call main(), turning a UserError into one clear line and exit status 2."""
    # a path that is not UTF-8 (its bytes kept as surrogates) is printed with escapes, where
    # a UTF-8 terminal's strict stdout would fail on it on every run (stderr already escapes)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        main()
    except UserError as e:
        report(e)
        sys.exit(2)
    except KeyboardInterrupt:
        if first_process():  # under torchrun every process gets the signal
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (`--help | head`): stop quietly, as Unix tools do
        write_nowhere_if_gone(sys.stdout)  # Python's own flush at exit would fail too
        sys.exit(128 + signal.SIGPIPE)
    except OSError as e:  # a path setting past the system's limit, wherever the script first looks at it
        if e.errno != errno.ENAMETOOLONG:
            raise
        name = os.fsdecode(e.filename) if e.filename is not None else "a path"
        report(UserError(f"file name too long: {name[:100]}{'...' if len(name) > 100 else ''}"))
        sys.exit(2)


def report(e: UserError) -> None:
    """The one line a user mistake prints."""
    print(f"error: {e}", file=sys.stderr, flush=True)


def stop_signals() -> list[int]:
    """The signals that stop a long run cleanly (train.py saves, synth.py writes its report):
    SIGTERM, Ctrl-C, and SIGHUP (a closed terminal or ssh session; torchrun passes it on)
    unless it is ignored, as under nohup (torchrun does not leave it ignored: it handles SIGHUP
    itself unless told otherwise with --signals-to-handle)."""
    hangup = [] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else [signal.SIGHUP]
    return [signal.SIGTERM, signal.SIGINT, *hangup]


def write_nowhere_if_gone(stream) -> bool:
    """Point a terminal or pipe behind stream at /dev/null (a file keeps its lines, and its
    failures); returns whether it did."""
    try:
        fd = stream.fileno()
        kind = os.fstat(fd).st_mode
    except (OSError, ValueError):  # no file behind it
        return False
    if not (stat.S_ISCHR(kind) or stat.S_ISFIFO(kind)):
        return False
    nowhere = os.open(os.devnull, os.O_WRONLY)
    os.dup2(nowhere, fd)
    os.close(nowhere)
    return True


class Unfailing:
    """stdout or stderr once a stop signal came. The signal may have ended where they lead:
    a terminal that hung up fails every write (EIO), and a `| tee` reader dies with the same
    Ctrl-C or hang-up (EPIPE). Either failure would end the run before its clean stop (a
    checkpoint, a report), so such a stream then writes to /dev/null instead."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self._despite_failure(self.stream.write, text)

    def flush(self) -> None:
        self._despite_failure(self.stream.flush)

    def _despite_failure(self, call, *args):
        try:
            return call(*args)
        except OSError:
            if not write_nowhere_if_gone(self.stream):
                raise
            return call(*args)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def alike_on_every_process():
    """Wraps checks that fail alike on every process torchrun starts (the command line):
    process 0 alone says why. The others wait for torchrun to stop them as process 0 exits
    (one exiting first could have process 0 stopped before it said anything); without
    torchrun (RANK set by another launcher), each says it after a minute."""
    try:
        yield
    except UserError:
        if not first_process():
            try:
                time.sleep(60)
            except KeyboardInterrupt:  # torchrun's SIGTERM, in a script that makes it one
                sys.exit(2)
        raise


def require(*checks: tuple[object, str]) -> None:
    """Each check is (condition, message): a UserError with the message of the first
    that fails. Scripts list their settings' limits with it, before any work starts."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def counted_lines(numbers: list[int], kind: str, shown: int = 5) -> str:
    """"1 malformed line (line 3)", "7 malformed lines (lines 3, 8, 9, 12, 20, ...)":
    a count of a file's lines that says where to look."""
    where = (f"line {numbers[0]}" if len(numbers) == 1 else
             f"lines {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}" if len(numbers) <= shown else
             f"lines {', '.join(map(str, numbers[:shown]))}, ...")
    return f"{len(numbers)} {kind} line{'s' * (len(numbers) > 1)} ({where})"


def is_number(value) -> bool:
    """A real number (numpy's too), not a bool: True is an int to isinstance, and JSON's true no number."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _finite(key: str, text: str, value):
    try:
        finite = math.isfinite(value)  # 1e999: inf would train nothing, or everything, silently
    except OverflowError:  # an integer past float's range
        finite = False
    if not finite:
        raise UserError(f"--{key} takes a finite number of a sensible size, not {text[:40]}")
    return value


_PADDED = re.compile(r"\s*[+-]?0+[0-9]+\s*")


def _literal(text: str):
    """ast.literal_eval(text), but an integer with leading zeros is that integer: Python reads
    no such literal, and --shard=07 (printf %02d's) is 7 to whoever typed it."""
    return int(text) if _PADDED.fullmatch(text) else ast.literal_eval(text)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(key: str, text: str, default):
    if isinstance(default, bool):  # before int: bool is a subclass of int
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise UserError(f"--{key} takes true or false, not {text!r}")
    if isinstance(default, (int, float)):
        try:
            value = _literal(text)
        except (ValueError, SyntaxError, RecursionError):  # RecursionError: "-" * 5000 + "1"
            value = None
        if not is_number(value) or (isinstance(default, int) and not isinstance(value, int)):
            raise UserError(f"--{key} takes {type(default).__name__}, not {text[:40]!r}")
        return type(default)(_finite(key, text, value))
    if default is None:  # a number if it looks like one, None as --help shows it, else the string
        try:
            value = _literal(text)
        except (ValueError, SyntaxError, RecursionError):
            return _home(key, text)
        return _finite(key, text, value) if is_number(value) else None if value is None else _home(key, text)
    return _home(key, text)


TEXT_SETTINGS = ("prompt", "stop", "model", "model_name", "api_base")  # the string settings that are no paths


def _home(key: str, text: str) -> str:
    """text with a ~/ that starts it, or starts one of its comma-separated parts (--data=~/a,~/b),
    made the home folder, as a shell does for `--out ~/x`, but not for `--out=~/x`: the script
    would make a folder named ~ in the current one. Text that is no path is left as it is."""
    if key in TEXT_SETTINGS:
        return text
    return ",".join(os.path.expanduser(part) if part.startswith("~/") else part for part in text.split(","))


_MISSING = object()


def _comments(defaults: dict) -> dict[str, str]:
    """The trailing comment of each `key=value,  # ...` line in the script's source, or
    in the source of a module whose DEFAULTS it took the setting from (finetune.py:
    train.py's), that is, whose DEFAULTS hold the same key with the same value."""
    main = sys.modules.get("__main__")
    modules = [main] + [m for m in list(sys.modules.values())
                        if m is not main and isinstance(getattr(m, "__dict__", {}).get("DEFAULTS"), dict)]
    sources = []
    for module in modules:
        try:
            sources.append((module, inspect.getsource(module)))
        except (OSError, TypeError):
            pass
    found = {}
    for key in defaults:
        for module, source in sources:
            if module is not main and module.DEFAULTS.get(key, _MISSING) != defaults[key]:
                continue
            m = re.search(rf"^\s*{re.escape(key)}\s*=(.*)$", source, re.M)
            if m:  # the script's own line, with or without a comment, ends the search
                found[key] = m.group(1).partition("#")[2].strip()
                break
    return {key: comment for key, comment in found.items() if comment}


def usage(defaults: dict, doc: str | None) -> str:
    lines = [(doc or "").strip()] + (["", "settings (--key=value):"] if defaults else [])
    comments = _comments(defaults)
    width = max((len(k) for k in defaults), default=0) + 2
    for key, value in defaults.items():
        lines.append(f"  --{key:<{width}} {value!r:<22} {comments.get(key, '')}".rstrip())
    return "\n".join(lines)


def _unknown(key: str, defaults: dict) -> UserError:
    """The error for a setting no script has, with the one it most likely meant."""
    off = key.removeprefix("no_")
    if off != key and isinstance(defaults.get(off), bool):  # --no-compile: the opposite of --compile
        return UserError(f"unknown setting --{key} (did you mean --{off}=false?)")
    initials = [k for k in defaults if "_" in k and key == "".join(w[:1] for w in k.split("_"))]
    close = initials if len(initials) == 1 else []  # --lr: --learning_rate, not --min_lr
    if not close and len(key) >= 3:  # a letter or two is close to, or in, almost anything
        close = (difflib.get_close_matches(key, defaults, n=1, cutoff=0.7)  # typos: --learnign_rate
                 # whole words of the name: --batch for --batch_size, but --out is no --dropout
                 or [k for k in defaults if f"_{key}_" in f"_{k}_" or f"_{k}_" in f"_{key}_"])
        prefixed = [k for k in defaults if k.startswith(key)]
        close = close or (prefixed if len(prefixed) == 1 else [])  # --temp: --temperature, the one it starts
    return UserError(f"unknown setting --{key}" + (f" (did you mean --{close[0]}?)" if close else " (see --help)"))


def subcommand(args: list[str], choices: tuple[str, ...]) -> str:
    """The one positional argument of a script with subcommands (synth.py, filter.py)."""
    if len(args) == 1 and args[0] in choices:
        return args[0]
    say = f"say {', '.join(choices[:-1])} or {choices[-1]} (see --help)"
    with alike_on_every_process():
        if not args:
            raise UserError(f"no subcommand: {say}")
        if args[0] not in choices:
            raise UserError(f"unknown subcommand {args[0]!r}: {say}")
        # a setting that lost its dashes (n=5), not a subcommand to choose
        raise UserError(f"unexpected argument {args[1]!r} after {args[0]} (settings are --key=value, see --help)")


def parse_args(defaults: dict, doc: str | None = None,
               argv: list[str] | None = None) -> tuple[SimpleNamespace, list[str]]:
    """Overrides from argv applied to a copy of defaults; returns (config, positionals)."""
    with alike_on_every_process():
        return _parse_args(defaults, doc, sys.argv[1:] if argv is None else list(argv))


def _parse_args(defaults: dict, doc: str | None, argv: list[str]) -> tuple[SimpleNamespace, list[str]]:
    cfg = dict(defaults)
    positionals: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            if first_process():  # under torchrun, once: eight copies interleave their lines
                print(usage(defaults, doc))
            sys.exit(0)
        if not arg.startswith("--"):
            positionals.append(arg)
            continue
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in defaults:
            raise _unknown(key, defaults)
        if not has_value:
            if isinstance(defaults[key], bool):
                # `--compile false` would set it true and leave "false" as a positional; no
                # subcommand (synth.py, filter.py) is such a word
                if i < len(argv) and argv[i].lower() in _TRUE + _FALSE:
                    raise UserError(f"--{key} takes its value after '=': --{key}={argv[i]}")
                cfg[key] = True
                continue
            # `--out_dir --compile` or `--out_dir -h`: a forgotten value (not `--lr -1`, a number)
            if i >= len(argv) or argv[i].startswith("--") or argv[i] == "-h":
                raise UserError(f"--{key} needs a value" + (f", not the setting {argv[i]}" if i < len(argv) else "")
                                + f" (--{key}=VALUE)")
            text = argv[i]
            i += 1
        cfg[key] = _convert(key, text, defaults[key])
    return SimpleNamespace(**cfg), positionals


def parse_settings(defaults: dict, doc: str | None = None, argv: list[str] | None = None) -> SimpleNamespace:
    """parse_args for a script that takes settings only: an argument that is not
    one (a forgotten --, a stray word) is a mistake, not something to ignore."""
    cfg, positionals = parse_args(defaults, doc, argv)
    if positionals:
        with alike_on_every_process():
            raise UserError(f"unexpected argument {positionals[0]!r} (settings are --key=value, see --help)")
    return cfg
