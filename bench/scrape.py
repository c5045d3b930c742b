"""``/metrics`` while training: scrape latency, and whether scraping slows training.

    .venv/bin/python bench/scrape.py [--rounds 40] [--steps 10] [--rate 10] [--model baby|tiny]
    .venv/bin/python bench/scrape.py --prometheus [--seconds 30]

Default: one run of the gpt backend with the prometheus plugin, scraped ``--rate`` times a second
by another process (a new connection per scrape, as Prometheus does) in alternating blocks of
``--steps`` steps, scraped and quiet: scrape latency (p50, p99) and the median step time of each
kind of block (wall, and the training thread's CPU time). For reference, the latency of the same
endpoint in a process that does nothing else.

``--prometheus``: the real Prometheus server (``prometheus`` on PATH) scrapes the run every
100 ms; the latency is its own ``scrape_duration_seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from observability import MODELS, StepClock, pct, registry, session  # noqa: E402

from trainctl.hooks.events import RunStart, StepEnd  # noqa: E402

SCRAPER = r"""
import http.client, json, sys, threading, time, urllib.parse
url, rate = urllib.parse.urlsplit(sys.argv[1]), float(sys.argv[2])
on, latencies, done, size = threading.Event(), [], threading.Event(), [0]
def scrape():
    tick = time.perf_counter()
    while not done.is_set():
        tick += 1 / rate
        if on.is_set():
            t = time.perf_counter()
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
            conn.request("GET", url.path)
            size[0] = len(conn.getresponse().read())
            conn.close()
            latencies.append(time.perf_counter() - t)
        time.sleep(max(tick - time.perf_counter(), 0))
threading.Thread(target=scrape, daemon=True).start()
for line in sys.stdin:
    if line.strip() == "on": on.set()
    elif line.strip() == "off": on.clear()
    else: break
done.set()
print(json.dumps({"latencies": latencies, "bytes": size[0]}))
"""


def start_scraper(address: str, rate: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRAPER, address, str(rate)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def command(scraper: subprocess.Popen, word: str) -> None:
    scraper.stdin.write(word + "\n")
    scraper.stdin.flush()


def latency_line(label: str, latencies: list[float]) -> str:
    return (f"{label} ({len(latencies)} scrapes): p50 {pct(latencies, 0.5) * 1e3:.2f} ms, "
            f"p99 {pct(latencies, 0.99) * 1e3:.2f} ms, max {max(latencies) * 1e3:.2f} ms")


def idle_latencies(args: argparse.Namespace) -> list[float]:
    """Scrape latency of the same exporter in a process that does nothing else: the floor the
    machine and the client set, to read the training numbers against."""
    from trainctl.hooks import RunInfo
    from trainctl.hooks.events import RunEnd
    from trainctl.plugins.prometheus import Config, PrometheusExporter

    with tempfile.TemporaryDirectory() as tmp:
        emitted: list = []
        exporter = PrometheusExporter(Config(port=0), RunInfo(run_name="bench", backend="gpt", out_dir=Path(tmp),
                                                              max_steps=10, emit=emitted.append))
        exporter.trainctl_run_start(RunStart(run_name="bench", backend="gpt", out_dir=tmp, start_step=0,
                                             max_steps=10, params=1, tokens_per_step=768, time=time.time()))
        for n in range(1, 11):
            exporter.trainctl_step_end(StepEnd(step=n, max_steps=10, lr=1e-3, tokens=768 * n, step_time=0.03,
                                               logged=True, loss=2.0, grad_norm=0.5, tokens_per_s=1e4, time=time.time()))
        scraper = start_scraper(emitted[0].data["address"], args.rate)
        command(scraper, "on")
        time.sleep(args.idle_s)
        latencies = json.loads(scraper.communicate("end\n", timeout=30)[0])["latencies"]
        exporter.trainctl_run_end(RunEnd(status="completed", step=10, tokens=0, duration=1.0, time=time.time()))
    return latencies


def alternating(args: argparse.Namespace) -> None:
    reg = registry()
    total = args.steps * (args.rounds * 2 + 1)  # the first block warms up and is not counted
    scraper: list[subprocess.Popen] = []
    toggles: list[tuple[int, bool]] = []

    def toggle(step: int) -> None:
        on = (step // args.steps) % 2 == 1 and step < total
        toggles.append((step, on))
        command(scraper[0], "on" if on else "off")

    idle = idle_latencies(args)
    StepClock.every = (args.steps, toggle)
    StepClock.on_address = lambda address: scraper.append(start_scraper(address, args.rate))
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        session(reg, Path(tmp) / "run", ["step_clock", "prometheus"], total, "train.threads=1", *MODELS[args.model]).fit()
    result = json.loads(scraper[0].communicate("end\n", timeout=30)[0])
    print(f"gpt {args.model}, 1 torch thread; scraped {args.rate:g}/s in {args.rounds} blocks of {args.steps} steps, "
          f"alternating with quiet ones; exposition {result['bytes']} bytes")
    print(latency_line("scrape latency while training", result["latencies"]))
    print(latency_line("the same endpoint, no training", idle))
    for clock, stamps in (("wall", StepClock.stamps), ("cpu", StepClock.cpu)):  # stamps[n - 1] is step n's
        scraped, quiet = [], []
        for (start, on), (end, _) in zip(toggles, toggles[1:]):
            block = [stamps[j] - stamps[j - 1] for j in range(start, end)]  # steps start+1 .. end
            (scraped if on else quiet).append(statistics.median(block))
        pairs = [s / q - 1 for s, q in zip(scraped, quiet)]
        print(f"median step ({clock} time): scraped {statistics.median(scraped) * 1e3:.2f} ms, quiet "
              f"{statistics.median(quiet) * 1e3:.2f} ms; median of {len(pairs)} per-pair ratios "
              f"{statistics.median(pairs):+.2%} (quartiles {pct(pairs, 0.25):+.2%} .. {pct(pairs, 0.75):+.2%})")


def with_prometheus(args: argparse.Namespace) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("bench/scrape.py --prometheus needs the prometheus binary (apt-get install prometheus)")
    reg = registry()
    procs: list[subprocess.Popen] = []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:

        def start_prometheus(address: str) -> None:
            port = urllib.parse.urlsplit(address).port
            config = Path(tmp) / "prometheus.yml"
            config.write_text("global:\n  scrape_interval: 100ms\n  scrape_timeout: 100ms\nscrape_configs:\n"
                              f"  - job_name: trainctl\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
            procs.append(subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
                                           f"--web.listen-address=127.0.0.1:{web}", "--log.level=error"]))

        StepClock.on_address = start_prometheus
        steps_per_s = 1 / 0.06  # about a baby GPT step on one core; the run is sized to --seconds
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            session(reg, Path(tmp) / "run", ["step_clock", "prometheus"], int(args.seconds * steps_per_s),
                    "train.threads=1", *MODELS[args.model]).fit()
        query = urllib.parse.urlencode({"query": 'scrape_duration_seconds{job="trainctl"}[1h]'})
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/query?{query}", timeout=10) as response:
            series = json.loads(response.read())["data"]["result"][0]["values"]
        procs[0].terminate()
        procs[0].wait(10)
    end = StepClock.stamps[-1] - time.perf_counter() + time.time()  # the last step, in unix time
    latencies = [float(v) for t, v in series if float(t) <= end]  # scrapes of a live run only
    print(latency_line(f"Prometheus scrape_duration_seconds at 10/s, gpt {args.model} training", latencies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--model", choices=sorted(MODELS), default="baby")
    parser.add_argument("--idle-s", type=float, default=15.0, help="seconds of scraping with no training, for reference")
    parser.add_argument("--prometheus", action="store_true", help="measure with the real Prometheus instead")
    parser.add_argument("--seconds", type=float, default=30.0, help="with --prometheus: about how long to train")
    args = parser.parse_args()
    (with_prometheus if args.prometheus else alternating)(args)


if __name__ == "__main__":
    main()
