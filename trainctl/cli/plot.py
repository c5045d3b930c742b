"""``trainctl plot RUN_DIR [RUN_DIR...] -o FILE.png``: training and validation loss, and the
learning rate, against the step, read from each run's ``events.jsonl``; several runs overlaid.
``--metric NAME`` adds a panel for a value the backend logs in each step's ``metrics`` (GRPO's
``reward``, ``completions/mean_length``, ``entropy``).

A resumed run logs the steps after its checkpoint again: the last record of a step wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import click

from trainctl.kernel.errors import ConfigError


def register(cli: click.Group) -> None:
    cli.add_command(plot)


@dataclass(kw_only=True, slots=True)
class Curves:
    """One run's curves: step -> value, the last record of a step winning."""

    name: str
    loss: dict[int, float] = field(default_factory=dict)
    lr: dict[int, float] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)  # the asked-for step metrics
    metric_names: set[str] = field(default_factory=set)  # every step metric the file has, for the refusal
    skipped: list[int] = field(default_factory=list)  # numbers of the lines that are not events


MAX_STEP = 2**63  # a step past int64 is no step trainctl wrote (and would overflow the plot's floats)


def read_curves(run_dir: Path, metrics: tuple[str, ...] = ()) -> Curves:
    """The curves of ``run_dir/events.jsonl``, with the step metrics named in ``metrics`` (a value
    that is not a finite number is not drawn). JSON lines that are not trainctl events (not an
    object, or a step or evaluation whose step or loss has the wrong type: a file edited or
    written by something else) are skipped and counted in ``skipped``, so a damaged log still
    plots; a line that is not JSON at all means this is no events file (ConfigError), except a
    torn last line."""
    path = run_dir / "events.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no events.jsonl; is it a run directory (trainctl run --out DIR)?")
    curves = Curves(name=run_dir.name or str(run_dir), metrics={name: {} for name in metrics})
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except RecursionError:  # JSON nested thousands deep: no event
            record = None
        except ValueError:
            if number == len(lines):  # a run killed mid-write leaves a partial last line
                continue
            raise ConfigError(f"{path}:{number} is not JSON; is this a trainctl events file?") from None
        if not isinstance(record, dict):
            curves.skipped.append(number)
            continue
        kind, step, loss = record.get("event"), record.get("step"), record.get("loss")
        if kind not in ("step", "eval"):
            continue
        # loss null: a non-finite loss, written as null by the jsonl plugin; not plotted
        if not (type(step) is int and 0 <= step < MAX_STEP) or not (loss is None or _number(loss)) \
                or (kind == "step" and loss is not None and not _number(record.get("lr"))):
            curves.skipped.append(number)
            continue
        if loss is None:
            continue
        if kind == "step":
            curves.loss[step] = loss
            curves.lr[step] = record["lr"]
            logged = record.get("metrics")
            if isinstance(logged, dict):
                curves.metric_names.update(k for k, v in logged.items() if _number(v))
                for name, values in curves.metrics.items():
                    if _number(logged.get(name)):
                        values[step] = logged[name]
        elif record.get("split") == "val" and record.get("source", "local") == "local":
            curves.val[step] = loss
    if not curves.loss and not curves.val:
        note = f" ({skipped_note(curves)})" if curves.skipped else ""
        raise ConfigError(f"{path} has no logged steps{note}; plot it once training has logged")
    return curves


def _number(value: object) -> bool:
    """A finite number (not a bool) that converts to a float: JSON's 1e999 is inf, 10**400 overflows."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def skipped_note(curves: Curves) -> str:
    n = len(curves.skipped)
    return f"skipped {n} line{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} JSON but no trainctl event (first: line {curves.skipped[0]})"


def draw(runs: list[Curves], output: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    names = list(runs[0].metrics) if runs else []
    fig, (ax_loss, *ax_metrics, ax_lr) = plt.subplots(2 + len(names), 1, figsize=(9, 7 + 2 * len(names)), sharex=True,
                                                      height_ratios=[3, *[2] * len(names), 1.3])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        if run.loss:
            steps = sorted(run.loss)
            ax_loss.plot(steps, [run.loss[s] for s in steps], color=color, lw=1.2, label=f"{run.name} train")
            ax_lr.plot(steps, [run.lr[s] for s in steps], color=color, lw=1.2, label=run.name)
        for ax, name in zip(ax_metrics, names):
            values = run.metrics[name]
            ax.plot(sorted(values), [values[s] for s in sorted(values)], color=color, lw=1.2, label=run.name)
        if run.val:
            steps = sorted(run.val)
            ax_loss.plot(steps, [run.val[s] for s in steps], color=color, lw=1.6, ls="--", marker="o",
                         ms=4, label=f"{run.name} val")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title or "loss and learning rate")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize="small")
    for ax, name in zip(ax_metrics, names):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", default="plot.png", show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The image to write (.png, .svg or .pdf).")
@click.option("--title", default=None, help="Title of the loss panel.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="A step metric to plot in its own panel (repeatable), e.g. reward for GRPO.")
def plot(run_dirs: tuple[Path, ...], output: Path, title: str | None, metrics: tuple[str, ...]) -> None:
    """Plot train/val loss, step metrics and learning rate vs. step for one or more runs, overlaid."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("trainctl plot needs matplotlib: pip install 'trainctl[plot]'") from None
    runs = [read_curves(d, metrics) for d in run_dirs]
    for name in metrics:
        if not any(run.metrics[name] for run in runs):
            known = sorted(set().union(*(run.metric_names for run in runs)))
            raise ConfigError(f"no step logged metric {name!r} in {', '.join(str(d) for d in run_dirs)}; "
                              f"step metrics there: {', '.join(known) or 'none'}")
    for run, d in zip(runs, run_dirs):
        if run.skipped:  # one line per run: the plot is drawn without them
            click.echo(f"trainctl: warning: {d / 'events.jsonl'}: {skipped_note(run)}; plotted without them", err=True)
    names = [r.name for r in runs]
    for run, d in zip(runs, run_dirs):
        if names.count(run.name) > 1:  # same basename in different places: say where
            run.name = str(d)
    draw(runs, output, title)
    click.echo(f"wrote {output}")
