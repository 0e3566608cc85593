"""Tests for config.py: settings from the command line, --help, and one-line user errors."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import UserError, counted_lines, file_stamp, parse_args, parse_settings, require, run, subcommand, usage

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = dict(
    batch_size=8,
    learning_rate=1e-3,
    compile=False,
    shuffle=True,
    dropout=None,
    data="data/x",
)


def status_of(main):
    """run(main)'s exit status (a KeyboardInterrupt that escaped run() would stop pytest itself)."""
    try:
        run(main)
    except SystemExit as e:
        return e.code
    except KeyboardInterrupt:
        return "KeyboardInterrupt escaped"
    return None


def test_run_ends_a_user_error_or_ctrl_c_with_one_line(capsys, monkeypatch):
    def mistake():
        raise UserError("--x must be positive")

    def ctrl_c():
        raise KeyboardInterrupt

    assert status_of(mistake) == 2 and capsys.readouterr().err == "error: --x must be positive\n"
    assert status_of(ctrl_c) == 130 and capsys.readouterr().err == "interrupted\n"
    assert status_of(lambda: None) is None
    monkeypatch.setenv("RANK", "1")  # under torchrun: process 0 says it, for all of them
    assert status_of(ctrl_c) == 130 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert status_of(ctrl_c) == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_path_too_long_for_the_system_is_one_line_not_a_traceback(tmp_path):
    """Python's Path.exists() and is_file() raise ENAMETOOLONG where most scripts first look at
    a path setting: evaluate.py --samples, synth.py --out, train.py --out_dir, ... each ended in
    a traceback."""
    long = tmp_path / ("y" * 300)
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"--samples={long}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == f"error: file name too long: {str(long)[:100]}...\n"


def test_a_reader_that_stops_early_ends_the_output_quietly():
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from config import run; "
              "run(lambda: print('usage line\\n' * 100_000))")  # more than a pipe holds
    process = subprocess.Popen([sys.executable, "-c", script, str(ROOT)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # as `| head` does once it has its lines
    assert process.wait(timeout=60) == 141 and process.stderr.read() == b""


def test_a_path_that_is_not_utf8_is_printed_with_escapes_not_a_traceback():
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from config import run; "
              "run(lambda: print('already prepared: caf' + chr(0xdce9)))")  # os.fsdecode(b'caf\\xe9')
    done = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"}, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"already prepared: caf\\udce9\n", b"")


def test_a_file_stamp_changes_when_the_file_is_written_again_to_the_same_size(tmp_path):
    path = tmp_path / "ckpt.pt"
    assert file_stamp(path) is None
    path.write_text("one")
    os.utime(path, ns=(0, path.stat().st_mtime_ns - 10**9))  # written a second ago
    first = file_stamp(path)
    assert first == [3, path.stat().st_mtime_ns]
    path.write_text("two")
    assert file_stamp(path)[0] == 3 and file_stamp(path) != first


def test_require_reports_the_first_check_that_fails():
    require((True, "fine"), (1 < 2, "also fine"))
    with pytest.raises(UserError, match="^second$"):
        require((True, "first"), (False, "second"), (False, "third"))


def test_bools_take_common_spellings_in_any_case():
    for text in ("1", "true", "True", "YES", "on"):
        assert parse_settings(DEFAULTS, argv=[f"--compile={text}"]).compile is True
    for text in ("0", "false", "False", "NO", "off"):
        assert parse_settings(DEFAULTS, argv=[f"--shuffle={text}"]).shuffle is False
    with pytest.raises(UserError, match="--compile takes true or false, not 'maybe'"):
        parse_settings(DEFAULTS, argv=["--compile=maybe"])


def test_a_bare_bool_flag_sets_it_true():
    cfg = parse_settings(DEFAULTS, argv=["--compile", "--shuffle"])
    assert cfg.compile is True and cfg.shuffle is True  # not a toggle of a true default


def test_numbers_take_the_type_of_their_default():
    cfg = parse_settings(DEFAULTS, argv=["--learning_rate=1", "--batch_size=16"])
    assert (cfg.learning_rate, cfg.batch_size) == (1.0, 16)
    assert type(cfg.learning_rate) is float and type(cfg.batch_size) is int
    # True and False are ints to Python, not numbers to a user
    with pytest.raises(UserError, match="--batch_size takes int, not 'True'"):
        parse_settings(DEFAULTS, argv=["--batch_size=True"])
    with pytest.raises(UserError, match="--learning_rate takes float, not 'False'"):
        parse_settings(DEFAULTS, argv=["--learning_rate=False"])


def test_a_zero_padded_integer_is_that_integer():
    """Python reads no 07: a loop over printf %02d's shard numbers stopped at --shard=07,
    "takes int, not '07'"."""
    defaults = dict(shard=0, lr=1.0, block_size=None)
    cfg = parse_settings(defaults, argv=["--shard=07", "--lr=-0010", "--block_size=0512"])
    assert (cfg.shard, cfg.lr, cfg.block_size) == (7, -10.0, 512) and type(cfg.lr) is float
    assert parse_settings(defaults, argv=["--shard=00"]).shard == 0
    for kept in ("0x10", "0.5", "00.5", "1e3"):  # other literals read as before
        assert parse_settings(defaults, argv=[f"--block_size={kept}"]).block_size == eval(kept)
    with pytest.raises(UserError, match="^--shard takes int, not '0" + "9" * 38):  # past int()'s digits
        parse_settings(defaults, argv=["--shard=0" + "9" * 5000])


def test_settings_that_default_to_none_take_a_number_or_else_the_text():
    """And None, as --help shows the default."""
    for text, value in [("5", 5), ("2.5", 2.5), ("abc", "abc"), ("[1, 2]", "[1, 2]"),
                        ("True", "True"), ("'q'", "'q'"), ("None", None)]:
        dropout = parse_settings(DEFAULTS, argv=[f"--dropout={text}"]).dropout
        assert dropout == value and type(dropout) is type(value), text
    with pytest.raises(UserError, match="--dropout takes a finite number"):
        parse_settings(DEFAULTS, argv=["--dropout=1e999"])


def test_a_home_folder_in_a_value_is_expanded_as_the_shell_would_have(monkeypatch):
    """Bash leaves the ~ of --out_dir=~/runs as it is: the script made a folder named ~ in
    the current one (which a later rm -rf ~ would not remove alone)."""
    monkeypatch.setenv("HOME", "/home/me")
    assert parse_settings(DEFAULTS, argv=["--data=~/a,b,~/c"]).data == "/home/me/a,b,/home/me/c"
    assert parse_settings(DEFAULTS, argv=["--dropout=~/x"]).dropout == "/home/me/x"  # a None default
    for kept in ("~", "a~/b", "~user", "x ~/y"):  # not a home folder the shell would have made
        assert parse_settings(DEFAULTS, argv=[f"--data={kept}"]).data == kept
    # text, not paths: sample.py's prompt and stop strings, a model's name, a URL
    text = {"prompt": "~/x = 1", "stop": "~/,a\\,~/b", "model": "~/m", "model_name": "~/m", "api_base": "~/v1"}
    cfg = parse_settings(text, argv=[f"--{key}={value}" for key, value in text.items()])
    assert vars(cfg) == text


def test_values_may_hold_equals_signs():
    assert parse_settings(DEFAULTS, argv=["--data=a=b.bin"]).data == "a=b.bin"
    assert parse_settings(DEFAULTS, argv=["--data", "a=b.bin"]).data == "a=b.bin"


def test_a_setting_without_its_value_is_a_user_error():
    with pytest.raises(UserError, match=r"^--batch_size needs a value \(--batch_size=VALUE\)$"):
        parse_settings(DEFAULTS, argv=["--compile", "--batch_size"])
    # the next setting is no value: it made a folder named --compile, and compile stayed off
    with pytest.raises(UserError, match=r"^--data needs a value, not the setting --compile \(--data=VALUE\)$"):
        parse_settings(DEFAULTS, argv=["--data", "--compile"])
    assert parse_settings(DEFAULTS, argv=["--learning_rate", "-1e-3"]).learning_rate == -1e-3  # one dash: a value
    with pytest.raises(UserError, match=r"^--data needs a value, not the setting -h"):  # made a folder named -h
        parse_settings(DEFAULTS, argv=["--data", "-h"])


def test_unknown_setting_suggests_a_close_one():
    for typo in ("--batch=3", "--batch-sizes=3"):
        with pytest.raises(UserError, match=r"did you mean --batch_size\?"):
            parse_settings(DEFAULTS, argv=[typo])
    with pytest.raises(UserError, match=r"^unknown setting --epochs \(see --help\)$"):
        parse_settings(DEFAULTS, argv=["--epochs=3"])


@pytest.mark.parametrize("typo, defaults, guess", [
    ("--concurency=8", dict(n=10, concurrency=8, out=""), "--concurrency"),  # not --n, a letter of it
    ("--lr=1e-3", dict(min_lr=0.0, learning_rate=1e-3), "--learning_rate"),
    ("--learnign_rate=1e-3", dict(min_lr=0.0, learning_rate=1e-3), "--learning_rate"),
    ("--temprature=0", dict(temperature=0.8, top_p=0.95), "--temperature"),
    ("--corpse=a.jsonl", dict(corpus="", compile=False), "--corpus"),
    ("--sorce=hf", dict(source="local", out_dir=""), "--source"),
    ("--out=x", dict(dropout=0.0, timeout=1.0), None),  # in those names, but no word of them
    ("--x=1", dict(n=10, x_max=1), None),  # a letter is in too many names to guess from
    ("--temp=0", dict(temperature=0.8, top_p=0.95), "--temperature"),  # the one name it starts
    ("--hum=1", dict(humaneval_problems=0, humaneval_timeout=3.0), None),  # it starts two
])
def test_a_guess_is_the_setting_meant_or_none(typo, defaults, guess):
    with pytest.raises(UserError) as error:
        parse_settings(defaults, argv=[typo])
    hint = f"(did you mean {guess}?)" if guess else "(see --help)"
    assert str(error.value) == f"unknown setting {typo.partition('=')[0]} {hint}"


def test_a_bool_is_turned_off_with_false_not_no_or_a_separate_word():
    with pytest.raises(UserError, match=r"^unknown setting --no_compile \(did you mean --compile=false\?\)$"):
        parse_settings(DEFAULTS, argv=["--no-compile"])
    for word in ("false", "True", "0", "off"):
        with pytest.raises(UserError, match=f"^--compile takes its value after '=': --compile={word}$"):
            parse_args(DEFAULTS, argv=["--compile", word, "train"])
    # a subcommand after a bare bool is no value of it
    assert parse_args(DEFAULTS, argv=["--compile", "train"])[1] == ["train"]


def test_a_forgotten_dash_is_an_unexpected_argument():
    with pytest.raises(UserError, match="^unexpected argument '-batch_size=3' "):
        parse_settings(DEFAULTS, argv=["-batch_size=3"])


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_the_docstring_and_every_default_then_exits_0(capsys, flag):
    with pytest.raises(SystemExit) as exited:
        parse_args(DEFAULTS, "Train a small model.", argv=["--batch_size=3", flag, "--nope"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Train a small model.\n")
    shown = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  --")}
    assert list(shown) == [f"--{key}" for key in DEFAULTS]
    assert shown["--data"] == "'data/x'" and shown["--dropout"] == "None"  # repr: a string shows its quotes


def test_help_is_printed_once_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # every process torchrun starts reads the same --help
    with pytest.raises(SystemExit) as exited:
        parse_args(DEFAULTS, "Doc.", argv=["--help"])
    assert exited.value.code == 0 and capsys.readouterr().out == ""


def _module(monkeypatch, tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_help_takes_each_comment_from_the_script_or_the_module_it_took_the_default_from(
        monkeypatch, tmp_path):
    _module(monkeypatch, tmp_path, "cfgtest_other", (
        "DEFAULTS = dict(\n"
        "    zz_steps=99,  # another script's setting of the same name\n"
        ")\n"))
    _module(monkeypatch, tmp_path, "cfgtest_base", (
        "DEFAULTS = dict(\n"
        "    zz_steps=10,  # steps of the base script\n"
        "    zz_rate=0.5,  # rate of the base script\n"
        ")\n"))
    main = _module(monkeypatch, tmp_path, "cfgtest_main", (
        "import cfgtest_base\n"
        "DEFAULTS = dict(cfgtest_base.DEFAULTS)\n"
        "DEFAULTS.update(\n"
        "    zz_rate=0.1,  # this script's own rate\n"
        ")\n"))
    monkeypatch.setitem(sys.modules, "__main__", main)
    lines = usage(main.DEFAULTS, None).splitlines()
    assert [line.split(None, 2)[2] for line in lines if line.startswith("  --")] == [
        "steps of the base script", "this script's own rate"]


def test_subcommand_takes_exactly_one_known_word():
    choices = ("annotate", "train", "apply")
    assert subcommand(["train"], choices) == "train"
    for args, message in [([], "no subcommand"), (["filter"], "unknown subcommand 'filter'")]:
        with pytest.raises(UserError, match=f"^{message}: say annotate, train or apply \\(see --help\\)$"):
            subcommand(args, choices)
    # past the subcommand, a setting without its dashes: "say annotate, train or apply" sent the user astray
    with pytest.raises(UserError, match=r"^unexpected argument 'n=5' after train \(settings are --key=value, see --help\)$"):
        subcommand(["train", "n=5"], choices)


def test_values_no_parser_can_read_are_one_short_line():
    deep = "-" * 5000 + "1"  # nests past Python's recursion limit in ast.literal_eval
    with pytest.raises(UserError, match=r"^--batch_size takes int, not '-{40}'$"):
        parse_settings(DEFAULTS, argv=[f"--batch_size={deep}"])
    assert parse_settings(DEFAULTS, argv=[f"--dropout={deep}"]).dropout == deep
    for bare in ("--", "--=3"):  # no key: nothing to suggest
        with pytest.raises(UserError, match=r"^unknown setting -- \(see --help\)$"):
            parse_settings(DEFAULTS, argv=[bare])


def test_counted_lines_say_where_to_look():
    assert counted_lines([3], "malformed") == "1 malformed line (line 3)"
    assert counted_lines([3, 8, 12], "malformed") == "3 malformed lines (lines 3, 8 and 12)"
    assert counted_lines(list(range(1, 9)), "bad", shown=3) == "8 bad lines (lines 1, 2, 3, ...)"


def test_help_of_a_script_without_settings_has_no_empty_settings_list():
    assert usage({}, "Checks and benchmarks the kernel.") == "Checks and benchmarks the kernel."
    assert usage(DEFAULTS, "Doc.").splitlines()[:3] == ["Doc.", "", "settings (--key=value):"]
