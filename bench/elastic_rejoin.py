"""Issue 20's bar for elastic runs, measured: a 4-rank torchrun run (gloo, the baby GPT, two
agents of 2 ranks, c10d on loopback, ``--max-restarts=3``) loses one agent to ``kill -9`` (the
agent and its ranks), goes on at 2 ranks, then a third agent of 1 rank joins and the group
re-forms at 3; the run completes. Then, against an uninterrupted 4-rank run (2 agents x 2):

- the sample record (``data.record_samples``, cut back to the resumed steps as the record does)
  holds every global sample index of the run once: duplicated and skipped are counted, and
  every step's samples are the reference's;
- per-step losses (a step trained again after the kill: its last loss) at the steps trained at
  4 ranks equal the reference's bit for bit; at 2 and 3 ranks their largest relative difference
  is printed (the bar: <= 1e-6); and 2-rank and 3-rank references resumed from the trial's own
  checkpoints (torchrun --standalone) show whether the same world size gives the same bits;
- the ``recovery`` notice of each re-formation (phases from the last step before the fault to
  the first step after it) and, on this machine's clock, fault (the SIGKILL, the joining agent's
  start) to first step.

    python bench/elastic_rejoin.py                   # one trial, ~3.5 min on 2 shared cores
    python bench/elastic_rejoin.py --trials 2 --json r.json --keep /tmp/rejoin

Settings from bench/restart_time.py: the rendezvous host (agent A) is never killed;
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` on every agent (torch 2.13: else the joining agent
waits 60 s for a MASTER_ADDR and both fail); heartbeats at torchrun's defaults (5 s x 3: at
1 s x 2 a joining agent formed a group of its own on this loaded machine). ``train.grad_accum``
is 12, the micro-batches of a step over all ranks, a multiple of 4, 3 and 2: every world size
trains the same 96 sequences per step in the same order.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.restart_time import BIN, env, free_port, kill_tree, launch  # noqa: E402
from trainctl.backends import sample_record  # noqa: E402  (neither imports torch: the runs do)
from trainctl.hooks import notices  # noqa: E402
from trainctl.kernel import recovery  # noqa: E402

STEPS, SAVE_EVERY, GRAD_ACCUM, BATCH = 400, 10, 12, 8
KILL_AT = 85  # agent B dies at this step or just after: 5+ steps past the checkpoint at 80
JOIN_AT = 150  # agent C starts once the 2-rank group has trained to here
RUN = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", f"train.batch_size={BATCH}",
       "train.device='cpu'", "optim.lr=3e-3", "train.threads=1", "plugin.lr.warmup_steps=2",
       "plugin.lr.decay_steps=1000",  # a schedule not tied to max_steps: a reference stopped early trains alike
       "train.log_interval=1", "train.eval_interval=0", "train.eval_steps=1", f"train.grad_accum={GRAD_ACCUM}",
       f"train.save_interval={SAVE_EVERY}", "data.record_samples=true", f"train.max_steps={STEPS}"]
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def trainctl(out: Path, *overrides: str) -> list[str]:
    return ["-m", "trainctl", "run", "--yes", "--out", str(out), *(a for s in (*RUN, *overrides) for a in ("--set", s))]


def agent(port: int, nproc: int, nnodes: str, last_call: int, out: Path) -> list[str]:
    return [str(BIN / "torchrun"), f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=3", f"--rdzv-conf=last_call_timeout={last_call}",
            *trainctl(out)]


def events(out: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    except (OSError, ValueError):  # not there yet, or a line half written
        return []


def run_starts(out: Path) -> list[dict]:
    return [e for e in events(out) if e.get("event") == "run_start"]


def last_step(out: Path) -> int:
    """The newest step rank 0 has begun (its sample record's line comes before the forward):
    status.json is rewritten at most once a second, ~15 steps here, too coarse to kill between
    checkpoints (both first tries killed at step 90, inside the save of step 90)."""
    try:
        lines = sample_record.path(out, 0).read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):  # not there yet, or a line half written
        return 0


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(out) if e["event"] == "step"}  # a step trained again: its last loss


def wait(what: str, done, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"an agent exited ({[p.returncode for p in procs]}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} in {timeout} s")
        time.sleep(0.01)


def start_host(args: list[str], log: Path, port: int) -> subprocess.Popen:
    """The agent that binds the endpoint first hosts the rendezvous store: wait until it has."""
    host = launch(args, log, ENV)
    deadline = time.monotonic() + 60
    while True:
        if host.poll() is not None or time.monotonic() > deadline:
            kill_tree(host.pid)
            raise RuntimeError(log.read_text()[-2000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return host
        except OSError:
            time.sleep(0.05)


def finish(agents: list[subprocess.Popen], timeout: float) -> int:
    try:
        return max(abs(a.wait(timeout)) for a in agents)
    finally:
        for a in agents:
            kill_tree(a.pid)
            a.wait()


def reference4(work: Path, last_call: int) -> Path:
    """Uninterrupted: 2 agents x 2 ranks (--nnodes=2 closes the rendezvous once both are in)."""
    out, port = work / "ref4", free_port()
    out.mkdir()
    args = agent(port, 2, "2", last_call, out)
    agents = [start_host(args, work / "ref4-a.log", port)]
    agents.append(launch(args, work / "ref4-b.log", ENV))
    if (code := finish(agents, 600)) != 0:
        raise RuntimeError(f"the 4-rank reference exited {code}; see {work}")
    return out


def elastic(work: Path, last_call: int) -> tuple[Path, float, float]:
    """A (host, 2 ranks) and B (2 ranks); B killed whole at KILL_AT+; C (1 rank) joins at JOIN_AT+."""
    out, port = work / "run", free_port()
    out.mkdir()
    a = start_host(agent(port, 2, "1:2", last_call, out), work / "a.log", port)
    agents = [a]
    try:
        b = launch(agent(port, 2, "1:2", last_call, out), work / "b.log", ENV)
        agents.append(b)
        wait(f"step {KILL_AT} at 4 ranks", lambda: last_step(out) >= KILL_AT, agents, 300)
        if (ws := [s["world_size"] for s in run_starts(out)]) != [4]:
            raise RuntimeError(f"the group formed as {ws}, not 4 ranks (B joined after A's last call?)")
        killed = time.time()
        kill_tree(b.pid)  # the agent and its ranks: each rank is in a session of its own
        b.wait()
        agents.remove(b)
        started = lambda: len(run_starts(out)) == 2  # noqa: E731
        wait(f"step {JOIN_AT} at 2 ranks", lambda: started() and last_step(out) >= JOIN_AT, agents, 300)
        joined = time.time()
        agents.append(launch(agent(port, 1, "1:2", last_call, out), work / "c.log", ENV))
        if (code := finish(agents, 600)) != 0:
            raise RuntimeError(f"an agent exited {code}; see {work}")
        return out, killed, joined
    except BaseException:
        for p in agents:
            kill_tree(p.pid)
        raise


def same_size(work: Path, run: Path, ranks: int, start: int, end: int) -> dict[int, float]:
    """torchrun --standalone at ``ranks``, resumed from the trial's checkpoint at ``start``, to ``end``."""
    out, name = work / f"ref{ranks}", f"step-{start:06d}"
    shutil.copytree(run / "checkpoints" / name, out / "checkpoints" / name)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}",
                           *trainctl(out, f"train.max_steps={end}")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or run_starts(out)[0]["start_step"] != start:
        raise RuntimeError(f"the {ranks}-rank reference: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return losses(out)


def sample_check(run: Path, ref: Path, worlds: dict[int, int]) -> dict:
    """Every global sample index once; each step's samples the reference's, from ``worlds[step]`` ranks."""
    got, expected = sample_record.read(run), sample_record.read(ref)

    def rows(lines: list[dict]) -> list[tuple]:
        return sorted(s for line in lines for s in zip(line["index"], line["source"], line["offset"]))

    seen = Counter(i for lines in got.values() for line in lines for i in line["index"])
    total = STEPS * GRAD_ACCUM * BATCH
    return {
        "samples": total,
        "duplicated": sum(c - 1 for c in seen.values() if c > 1),
        "skipped": len(set(range(total)) - seen.keys()),
        "outside": len(seen.keys() - set(range(total))),
        "steps_as_reference": sum(rows(got.get(s, [])) == rows(expected[s]) for s in expected),
        "steps_with_their_ranks": sum(sorted(line["rank"] for line in got.get(s, [])) == list(range(worlds[s]))
                                      for s in range(1, STEPS + 1)),
    }


def worst(got: dict[int, float], ref: dict[int, float], steps: range) -> dict:
    rel = {s: abs(got[s] - ref[s]) / abs(ref[s]) for s in steps}
    top = max(rel, key=rel.get)
    return {"steps": len(steps), "bit_equal": sum(got[s] == ref[s] for s in steps),
            "max_rel": rel[top], "at_step": top, "first_rel": rel[steps[0]]}


def trial(work: Path, last_call: int) -> dict:
    ref = reference4(work, last_call)
    run, killed, joined = elastic(work, last_call)
    starts, records = run_starts(run), events(run)
    if [s["world_size"] for s in starts] != [4, 2, 3]:
        raise RuntimeError(f"world sizes {[s['world_size'] for s in starts]}, not [4, 2, 3]; see {work}")
    s1, s2 = starts[1]["start_step"], starts[2]["start_step"]
    worlds = {s: 4 if s <= s1 else 2 if s <= s2 else 3 for s in range(1, STEPS + 1)}
    notes = [r for r in records if r.get("event") == "notice" and r.get("kind") == notices.RECOVERY]
    firsts = [next(r for r in records[records.index(start):] if r.get("event") == "step") for start in starts[1:]]
    reformed = [{**{k: n["data"][k] for k in (*recovery.PHASES, "total_s", "last_step", "restarts")},
                 "resumed_at": start["start_step"], "world_size": start["world_size"],
                 "steps_retrained": n["data"]["last_step"] - start["start_step"],
                 "fault_to_first_step_s": round(first["time"] - fault, 3)}
                for n, start, first, fault in zip(notes, starts[1:], firsts, (killed, joined))]
    got, ref4 = losses(run), losses(ref)
    if sorted(got) != list(range(1, STEPS + 1)) or sorted(ref4) != sorted(got):
        raise RuntimeError(f"steps logged: run {len(got)}, reference {len(ref4)}")
    ref2 = same_size(work, run, 2, s1, s2)
    ref3 = same_size(work, run, 3, s2, STEPS)
    return {
        "resumed_at": [s1, s2], "reformed": reformed, "samples": sample_check(run, ref, worlds),
        "at_4_vs_ref4": worst(got, ref4, range(1, s1 + 1)),
        "at_2_vs_ref4": worst(got, ref4, range(s1 + 1, s2 + 1)),
        "at_3_vs_ref4": worst(got, ref4, range(s2 + 1, STEPS + 1)),
        "at_2_vs_ref2": worst(got, ref2, range(s1 + 1, s2 + 1)),
        "at_3_vs_ref3": worst(got, ref3, range(s2 + 1, STEPS + 1)),
    }


def report(row: dict) -> str:
    s = row["samples"]
    lines = [f"resumed at steps {row['resumed_at']} (world sizes 4 -> 2 -> 3); {s['samples']} samples: "
             f"{s['duplicated']} duplicated, {s['skipped']} skipped, {s['steps_as_reference']} of {STEPS} steps "
             "the reference's samples", "", "| steps | against | steps | bit for bit | max relative |",
             "| --- | --- | --- | --- | --- |"]
    for key in ("at_4_vs_ref4", "at_2_vs_ref4", "at_3_vs_ref4", "at_2_vs_ref2", "at_3_vs_ref3"):
        size, ref = key[3], key[-4:]
        r = row[key]
        lines.append(f"| at {size} ranks | {ref} | {r['steps']} | {r['bit_equal']} | {r['max_rel']:.2e} |")
    lines += ["", "| re-formation | " + " | ".join(recovery.PHASES) + " | total_s | fault to first step | retrained |",
              "| --- " * (len(recovery.PHASES) + 4) + "|"]
    for name, r in zip(("kill -9 -> 2 ranks", "join -> 3 ranks"), row["reformed"]):
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in (*recovery.PHASES, "total_s"))
                     + f" | {r['fault_to_first_step_s']:.2f} | {r['steps_retrained']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--last-call-timeout", type=int, default=5,
                    help="c10d's (torchrun: 30 s); B must reach the first rendezvous within it of A")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it")
    ap.add_argument("--json", type=Path, help="write the trials here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="trainctl-rejoin-") as tmp:
        for i in range(args.trials):
            work = (args.keep or Path(tmp)) / f"trial-{i}"
            work.mkdir(parents=True)
            rows.append(trial(work, args.last_call_timeout))
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        print(report(row))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
