"""Evaluation and checkpoints per epoch (``train.eval_strategy`` / ``save_strategy = "epoch"``):
at the steps where transformers' ``Trainer`` evaluates and saves under ``eval_strategy`` /
``save_strategy = "epoch"``, computed here by transformers' own ``DefaultFlowCallback`` driven
through the epoch loop of ``Trainer._inner_training_loop`` / ``_run_epoch``; the real TRL run is
in ``tests/test_trl_parity.py``."""

from __future__ import annotations

import math

import pytest

from tests.conftest import make_config
from tests.recording_plugins import INSTANCES
from trainctl.hooks.cadence import EpochEnds, Every, schedule
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run


def trainer_epoch_steps(steps_per_epoch: int, max_steps: int) -> tuple[list[int], list[int]]:
    """(evaluated, saved) global steps of a Trainer with eval_strategy = save_strategy = "epoch".
    The loop is ``_inner_training_loop``'s: ``num_train_epochs = ceil(max_steps /
    num_update_steps_per_epoch)``; in each epoch ``on_step_end`` after every update, the epoch's
    loop left when ``should_training_stop`` (max_steps reached), then ``on_epoch_end`` whatever
    happened; ``_maybe_log_save_evaluate`` acts on the flags after each and clears them."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import DefaultFlowCallback

    args = TrainingArguments(output_dir="unused", eval_strategy="epoch", save_strategy="epoch", report_to="none",
                             use_cpu=True)
    state, control, flow = TrainerState(max_steps=max_steps), TrainerControl(), DefaultFlowCallback()
    evaluated, saved = [], []

    def act() -> None:
        if control.should_evaluate:
            evaluated.append(state.global_step)
        if control.should_save:
            saved.append(state.global_step)
        control.should_evaluate = control.should_save = False

    for epoch in range(math.ceil(max_steps / steps_per_epoch)):
        for step in range(steps_per_epoch):
            state.global_step += 1
            state.epoch = epoch + (step + 1) / steps_per_epoch
            flow.on_step_end(args, state, control)
            act()
            if control.should_training_stop:
                break
        flow.on_epoch_end(args, state, control)
        act()
        if control.should_training_stop:
            break
    return evaluated, saved


def kernel_steps(registry, tmp_path, steps_per_epoch: float, max_steps: int, *extra: str):
    config = make_config(registry, tmp_path / "out", 'plugins=["checkpoint", "recorder"]', f"train.max_steps={max_steps}",
                         f"data.steps_per_epoch={steps_per_epoch}", "train.eval_strategy='epoch'",
                         "train.save_strategy='epoch'", "train.eval_interval=3", "train.save_interval=2", *extra)
    assert Run(config, registry, resume="never").fit().status == "completed"
    events = INSTANCES["recorder"].events
    evaluated = sorted({e.step for e in events if type(e).__name__ == "EvalEnd"})
    return evaluated, [e.step for e in events if type(e).__name__ == "CheckpointSaved"]


@pytest.mark.parametrize(("per_epoch", "max_steps"), [(4, 12), (4, 10), (5, 3), (1, 3)])
def test_epoch_cadence_is_the_trainers(registry, tmp_path, per_epoch, max_steps):
    """3 whole epochs, 2.5 epochs (the last cut by max_steps: on_epoch_end still fires there), a run
    shorter than one epoch, one step per epoch; eval_interval and save_interval are not used."""
    ours = kernel_steps(registry, tmp_path, per_epoch, max_steps)
    assert ours == trainer_epoch_steps(per_epoch, max_steps)


def test_save_total_limit_keeps_the_last_epochs(registry, tmp_path):
    """``save_total_limit: 2`` (plugin.checkpoint.keep_last): the checkpoints of the last two epochs stay,
    as Trainer's rotate_checkpoints leaves them."""
    kernel_steps(registry, tmp_path, 4, 12, "plugin.checkpoint.keep_last=2")
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("step-*")) == ["step-000008", "step-000012"]


def test_epoch_ends_when_steps_run_over_an_epoch_end():
    """data.epoch_end = "continue": 2.5 steps an epoch end during steps 3, 5, 8, 10."""
    ends = EpochEnds(2.5, at_end=False)
    assert [s for s in range(1, 11) if ends.due(s, 10)] == [3, 5, 8, 10]
    assert [s for s in range(1, 10) if EpochEnds(1 / 3, at_end=False).due(s, 9)] == list(range(1, 10))
    assert isinstance(schedule("steps", 5, 2.5), Every) and not schedule("steps", 5, 2.5).due(10 - 1, 100)


def test_steps_cadence_is_unchanged(registry, tmp_path):
    config = make_config(registry, tmp_path / "out", 'plugins=["checkpoint", "recorder"]', "train.max_steps=7",
                         "data.steps_per_epoch=2", "train.eval_interval=3", "train.save_interval=2")
    Run(config, registry, resume="never").fit()
    events = INSTANCES["recorder"].events
    assert sorted({e.step for e in events if type(e).__name__ == "EvalEnd"}) == [3, 6, 7]
    assert [e.step for e in events if type(e).__name__ == "CheckpointSaved"] == [2, 4, 6, 7]


@pytest.mark.parametrize("key", ["eval_strategy", "save_strategy"])
def test_epoch_cadence_needs_a_backend_with_epochs(registry, tmp_path, key):
    config = make_config(registry, tmp_path / "out", f"train.{key}='epoch'")
    with pytest.raises(ConfigError, match=rf"train.{key} = 'epoch' needs a backend that counts epochs \(hf\); the fake"):
        Run(config, registry, resume="never")


def test_the_plan_says_which_cadence(registry, tmp_path):
    config = make_config(registry, tmp_path / "out", "data.steps_per_epoch=4", "train.eval_strategy='epoch'",
                         "train.save_interval=5")
    line = Run(config, registry, resume="never").cadence_line()
    assert line == ("evaluate at each epoch's end (an epoch is 4 steps) and at the end (train.eval_strategy = 'epoch'); "
                    "save every 5 steps and at the end (train.save_strategy = 'steps')")


def test_a_resumed_run_keeps_the_epoch_cadence(registry, tmp_path):
    """Stopped at step 5 and resumed: the evaluations and saves still land on the epoch ends (8, 12)."""
    out = tmp_path / "out"
    common = ("data.steps_per_epoch=4", "train.max_steps=12", "train.eval_strategy='epoch'", "train.save_strategy='epoch'")
    first = make_config(registry, out, 'plugins=["checkpoint", "script", "recorder"]', "plugin.script.stop_at=[5]", *common)
    assert Run(first, registry, resume="never").fit().step == 5
    second = make_config(registry, out, 'plugins=["checkpoint", "recorder"]', *common)
    session = Run(second, registry, resume="auto")
    assert session.resumed_from.endswith("step-000005")
    assert session.fit().status == "completed"
    events = INSTANCES["recorder"].events
    assert sorted({e.step for e in events if type(e).__name__ == "EvalEnd"}) == [8, 12]
    assert [e.step for e in events if type(e).__name__ == "CheckpointSaved"] == [8, 12]
