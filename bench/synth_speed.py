"""Records/s of synth.py against the tests' fake OpenAI-compatible server at a fixed latency.

Each row runs `synth.py textbook` in this process for about --seconds at one
concurrency. The server answers without faults or duplicates, so every request makes a
record, and the ideal is n records in their shortest time: ceil(n / concurrency)
latencies, and under --rpm no less than (n - rpm/60) / (rpm/60) s plus one latency (the
one second's worth of requests llm.py's bucket lets through at the start, then rpm/60 a
second). Throughput should follow concurrency until a configured limit binds (or the
CPU does).

    python bench/synth_speed.py
    python bench/synth_speed.py --latency_ms=500 --concurrency=1,16,128 --rpm=6000
"""

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import synth  # noqa: E402
from config import parse_settings, require, run  # noqa: E402
from llm_server import FakeLLM, digest, prose  # noqa: E402

DEFAULTS = dict(
    latency_ms=200.0,  # the fake server's time per answer
    concurrency="1,8,64",  # concurrencies to measure, without a rate limit
    rpm=1800,  # then the highest concurrency again under this --rpm (0: skip that row)
    seconds=3.0,  # about how long each row runs
)


def measure(url: str, concurrency: int, rpm: int, n: int) -> tuple[float, int]:
    """(seconds, requests) of one run making n textbook records."""
    with tempfile.TemporaryDirectory() as folder, open(os.devnull, "w") as quiet:
        out = Path(folder) / "t.jsonl"
        started = time.perf_counter()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            synth.main(["textbook", f"--n={n}", f"--out={out}", f"--api_base={url}", "--model=fake",
                        f"--concurrency={concurrency}", f"--rpm={rpm}"])
        seconds = time.perf_counter() - started
        return seconds, json.loads(Path(f"{out}.report.json").read_text())["run"]["requests"]


def main():
    cfg = parse_settings(DEFAULTS, __doc__)
    levels = [int(c) if c.strip().isdecimal() else 0 for c in str(cfg.concurrency).split(",")]
    require((min(levels) > 0, f"--concurrency takes positive whole numbers, not {cfg.concurrency!r}"),
            (cfg.latency_ms > 0 and cfg.seconds > 0, "--latency_ms and --seconds must be positive"),
            (cfg.rpm >= 0, f"--rpm must not be negative, not {cfg.rpm}"))
    latency = cfg.latency_ms / 1000
    rows = [(c, 0) for c in levels] + ([(levels[-1], cfg.rpm)] if cfg.rpm else [])
    print(f"synth.py textbook against a fake server answering in {cfg.latency_ms:g} ms "
          f"({len(os.sched_getaffinity(0))} CPUs)\n")
    print(f"{'concurrency':>11} {'rpm limit':>9} {'records':>7} {'requests':>8} {'seconds':>7} "
          f"{'records/s':>9} {'ideal':>7}")
    with FakeLLM(latency=latency, answer=lambda body: prose(digest(body), duplicates=False)) as server:
        for concurrency, rpm in rows:
            rate = rpm / 60 if rpm else concurrency / latency
            n = max(10, round(min(concurrency / latency, rate) * cfg.seconds))
            shortest = max(-(-n // concurrency) * latency, (max(0.0, n - rate) / rate if rpm else 0.0) + latency)
            ideal = n / shortest
            seconds, requests = measure(server.url, concurrency, rpm, n)
            print(f"{concurrency:>11} {rpm or '-':>9} {n:>7} {requests:>8} {seconds:>7.2f} {n / seconds:>9.1f} "
                  f"{ideal:>7.1f}", flush=True)

if __name__ == "__main__":
    run(main)
