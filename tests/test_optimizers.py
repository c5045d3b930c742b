"""Optimizers by name (``optim.name`` sgd / adafactor / adamw_8bit, ``optim.implementation``):
built as torch and TRL build them, resumable from their checkpoints, refused in one line where
they cannot run, and stepping as ``SFTTrainer`` with the same ``optim`` does."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest
import torch

from tests.conftest import TINY_GPT, run_cli
from tests.test_gpt_model import tiny_model, train_steps
from tests.test_hf_trl_user import ACCUM, BATCH, LR, MAX_LENGTH, SEED, STEPS, WARMUP, cli_run, events, trl_losses
from trainctl.backends.optim import build_optimizer
from trainctl.kernel.errors import ConfigError


def make(model, name, device_type="cpu", **kw):
    args = dict(name=name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type=device_type,
                muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.1)
    return build_optimizer(model, **{**args, **kw})


@pytest.mark.parametrize("implementation, fused, foreach", [
    ("auto", True, None), ("fused", True, None), ("foreach", None, True), ("for_loop", False, False),
])
def test_adamw_implementation_is_torchs_kernel_choice(implementation, fused, foreach):
    opt = make(tiny_model(), "adamw", implementation=implementation)
    assert (opt.defaults["fused"], opt.defaults["foreach"]) == (fused, foreach)
    muon = make(tiny_model(), "muon", implementation=implementation)  # its AdamW sidecar too
    assert (muon.adamw.defaults["fused"], muon.adamw.defaults["foreach"]) == (fused, foreach)


def test_every_adamw_kernel_takes_the_same_steps():
    losses = {impl: train_steps(m, make(m, "adamw", implementation=impl), 5)
              for impl in ("fused", "foreach", "for_loop") for m in [tiny_model()]}
    assert losses["foreach"] == pytest.approx(losses["for_loop"], rel=1e-5)
    assert losses["fused"] == pytest.approx(losses["for_loop"], rel=1e-5)


def test_sgd_and_adafactor_are_built_as_trl_builds_them():
    from transformers.optimization import Adafactor

    sgd = make(tiny_model(), "sgd", momentum=0.9)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.1, 0.0]  # matrices decay, gains do not
    assert [g["lr_scale"] for g in sgd.param_groups] == [1.0, 1.0]
    ada = make(tiny_model(), "adafactor")
    assert type(ada) is Adafactor and [g["weight_decay"] for g in ada.param_groups] == [0.1, 0.0]
    assert ada.defaults["scale_parameter"] is False and ada.defaults["relative_step"] is False
    assert ada.defaults["lr"] == 1e-3


@pytest.mark.parametrize("name, kw", [("sgd", {"momentum": 0.9}), ("adafactor", {}), ("adamw", {"implementation": "for_loop"})])
def test_state_dict_loads_weights_only_and_resumes_bit_identically(name, kw):
    whole = tiny_model()
    opt = make(whole, name, **kw)
    train_steps(whole, opt, 6)
    first = tiny_model()
    opt_first = make(first, name, **kw)
    train_steps(first, opt_first, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # the checkpoint reader's unpickler
    resumed = tiny_model(seed=5)
    resumed.load_state_dict(state["model"])
    opt_resumed = make(resumed, name, **kw)
    opt_resumed.load_state_dict(state["optim"])
    train_steps(resumed, opt_resumed, 3)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


@pytest.mark.parametrize("kw, message", [
    ({"name": "adamw_8bit"}, "optim.name = adamw_8bit needs CUDA and bitsandbytes; use adamw on CPU"),
    ({"name": "adafactor", "implementation": "foreach"}, "adafactor has one: set it to 'auto'"),
    ({"name": "adamw", "implementation": "fused", "device_type": "meta"}, "fused has no kernel on meta"),
    ({"name": "adamw", "lr": 0.0}, "optim.lr must be positive"),
])
def test_what_cannot_run_is_one_config_error(kw, message):
    with pytest.raises(ConfigError, match=message) as info:
        make(tiny_model(), **{"name": kw.pop("name"), **kw})
    assert "\n" not in str(info.value)


def test_adamw_8bit_on_cuda_is_bitsandbytes_with_embeddings_at_32_bits(monkeypatch):
    """The wiring TRL's ``optim = "adamw_8bit"`` has, checked against a stand-in bitsandbytes
    (the real one needs CUDA); without bitsandbytes it is one line."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match="needs bitsandbytes: pip install bitsandbytes"):
        make(tiny_model(), "adamw_8bit", device_type="cuda")
    overrides, built = [], {}

    class Manager:
        @staticmethod
        def get_instance():
            return Manager

        @staticmethod
        def register_module_override(module, name, config):
            overrides.append((type(module).__name__, name, config))

    class AdamW(torch.optim.AdamW):
        def __init__(self, groups, *, optim_bits, **kw):
            built.update(optim_bits=optim_bits, **kw)
            super().__init__(groups, **kw)

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(GlobalOptimManager=Manager, AdamW=AdamW))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    opt = make(tiny_model(), "adamw_8bit", device_type="cuda")
    assert built == {"optim_bits": 8, "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert overrides == [("Embedding", "weight", {"optim_bits": 32})] * 2  # GPT's token and position tables


def test_adamw_8bit_on_cpu_stops_the_cli_in_one_line(tmp_path):
    proc = run_cli("run", "--backend", "gpt", "--yes", "--out", str(tmp_path / "o"),
                   *[a for s in (*TINY_GPT, "train.max_steps=2", "optim.name='adamw_8bit'") for a in ("--set", s)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "trainctl: error: optim.name = adamw_8bit needs CUDA and bitsandbytes; use adamw on CPU"


def gpt_losses(out):
    return {e["step"]: e["loss"] for e in map(json.loads, (out / "events.jsonl").read_text().splitlines())
            if e["event"] == "step"}


@pytest.mark.parametrize("optim", [["optim.name='sgd'", "optim.momentum=0.9", "optim.lr=0.3"], ["optim.name='adafactor'"]],
                         ids=["sgd", "adafactor"])
def test_cli_resume_continues_the_optimizer_exactly(tmp_path, optim):
    common = [*TINY_GPT, "train.threads=1", "train.log_interval=1", "train.eval_interval=0",
              "train.save_interval=4", 'plugins=["lr", "checkpoint", "jsonl"]', "plugin.lr.warmup_steps=2",
              "plugin.lr.decay_steps=8", *optim]

    def run(out, steps, resume):
        sets = [*common, f"train.max_steps={steps}"]
        proc = run_cli("run", "--backend", "gpt", "--yes", "--out", str(out), "--resume", resume,
                       *[a for s in sets for a in ("--set", s)])
        assert proc.returncode == 0, proc.stderr
        return proc

    run(tmp_path / "whole", 8, "never")
    run(tmp_path / "split", 4, "never")
    assert "step-000004" in run(tmp_path / "split", 8, "auto").stdout  # resumed, not started again
    whole, split = gpt_losses(tmp_path / "whole"), gpt_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 9))
    assert split == whole  # exact, every step: momentum / factored moments came back


HF_COMMON = [f"seed={SEED}", f"train.max_steps={STEPS}", f"train.batch_size={BATCH}", f"train.grad_accum={ACCUM}",
             f"model.max_length={MAX_LENGTH}", "data.packing=false", "data.shuffle=false", "data.val_fraction=0.0",
             f"optim.lr={LR}", "optim.beta2=0.999", "plugin.lr.schedule='cosine'", "plugin.lr.family='transformers'",
             f"plugin.lr.warmup_steps={WARMUP}"]


@pytest.mark.parametrize("ours, theirs", [
    (["optim.name='adafactor'"], {"optim": "adafactor"}),
    (["optim.name='sgd'", "optim.lr=0.3"], {"optim": "sgd", "learning_rate": 0.3}),
    (["optim.name='sgd'", "optim.lr=0.3", "optim.momentum=0.9", "optim.weight_decay=0.01"],
     {"optim": "sgd", "learning_rate": 0.3, "optim_args": "momentum=0.9", "weight_decay": 0.01}),
], ids=["adafactor", "sgd", "sgd-momentum"])
def test_hf_steps_as_sft_trainer_with_the_same_optim(hf, tmp_path, ours, theirs):
    proc = cli_run(hf, tmp_path / "ours", hf.prompt_completion, f"model.tokenizer={hf.plain_tokenizer}", *HF_COMMON, *ours)
    assert proc.returncode == 0, proc.stderr
    got = events(tmp_path / "ours")
    want, lrs = trl_losses(hf, hf.prompt_completion, tmp_path / "trl", **theirs)
    assert len(want) == len(got) == STEPS
    assert [e["lr"] for e in got] == pytest.approx(lrs, rel=1e-9, abs=1e-15)
    assert [e["loss"] for e in got] == want  # bit-identical, step by step
    assert want[-1] < want[0]  # it trained: the comparison is not between two frozen models


def test_config_file_keys_reach_the_optimizer():
    """``[optim]`` as the schema reads it builds the optimizer it names (from_config)."""
    from trainctl.backends.optim import from_config
    from trainctl.kernel.schema import OptimConfig

    opt = from_config(tiny_model(), OptimConfig(name="sgd", momentum=0.5, implementation="foreach"), "cpu")
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5 and opt.defaults["foreach"] is True
