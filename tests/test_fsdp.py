"""FSDP2 (``train.parallel = "fsdp"``) for real: 2 ranks on this CPU (gloo) under torchrun and
accelerate launch, against one process at the same global batch.

The equality tests are what catches the known gloo caveat (gradients summed instead of
averaged): a wrong reduction changes the losses from the first update on.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, run_cli
from tests.live import sets
from tests.test_distributed import ACCELERATE, SAME, TORCHRUN, assert_close, env, evals, events, launch, losses, single
from trainctl.kernel.accelerate_env import apply
from trainctl.kernel.errors import ConfigError

FSDP = "train.parallel='fsdp'"
OBSERVED = ['plugins=["defaults", "layer_stats", "samples"]', "plugin.layer_stats.every=5", "plugin.samples.every=10",
            "plugin.samples.max_new_tokens=8"]


def notices(out, kind: str) -> dict[int, dict]:
    return {e["step"]: e["data"] for e in events(out) if e["event"] == "notice" and e.get("kind") == kind}


def test_gpt_two_ranks_fsdp_equal_one_process_and_resume(tmp_path):
    """20 steps, 4 micro-batches a step (2 per rank), float32: the same losses, evaluations and
    per-layer norms (global, from the shards) as one process; generation and layer norms run on
    every rank in lockstep. The checkpoints carry across strategies and world sizes: FSDP on 2
    ranks to step 10, DDP in one process to 15, FSDP on 2 ranks again to 20."""
    # lr 1e-3: at the tiny config's 3e-3, DDP itself leaves one process's losses by 7e-5 at step 14
    # (Adam's update of near-zero moments amplifies rounding), which would test chaos, not the reduction
    common = [*OBSERVED, "train.grad_accum=4", "train.eval_interval=10", "optim.lr=1e-3"]
    single(tmp_path / "one", *common, "train.max_steps=20")
    launch(TORCHRUN, tmp_path / "fsdp", *common, FSDP, "train.max_steps=10")
    single(tmp_path / "fsdp", *common, "train.max_steps=15")
    launch(TORCHRUN, tmp_path / "fsdp", *common, FSDP, "train.max_steps=20")
    one, fsdp = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    print("gpt fsdp 2 ranks vs 1 process, largest step-loss difference:", max(abs(one[k] - fsdp[k]) for k in one))
    assert len(one) == 20
    assert_close(fsdp, one)
    reference, chained = evals(tmp_path / "one"), evals(tmp_path / "fsdp")  # + the end of the DDP leg at 15
    assert set(chained) - set(reference) == {(15, "train"), (15, "val")}
    assert_close({k: v for k, v in chained.items() if k in reference}, reference)
    stats_one, stats_fsdp = notices(tmp_path / "one", "layer_stats"), notices(tmp_path / "fsdp", "layer_stats")
    assert sorted(stats_fsdp) == [5, 10, 15, 20] and stats_fsdp.keys() == stats_one.keys()  # 15: from DDP
    for step in stats_one:
        assert_close(stats_fsdp[step], stats_one[step], 1e-4)
    assert all(s["texts"][0] for s in notices(tmp_path / "fsdp", "samples").values())
    starts = [e for e in events(tmp_path / "fsdp") if e["event"] == "run_start"]
    assert [(s["parallel"], s["world_size"]) for s in starts] == [("fsdp", 2), ("ddp", 1), ("fsdp", 2)]
    assert starts[1]["resumed_from"].endswith("step-000010") and starts[2]["resumed_from"].endswith("step-000015")
    # the checkpoint written from the shards evaluates in one process to the sharded run's numbers
    result = json.loads(run_cli("eval", str(tmp_path / "fsdp"), "--json", check=True).stdout)
    assert result["step"] == 20 and abs(result["val_loss"] - chained[(20, "val")]) < 1e-5, result


def test_each_rank_holds_half_and_a_nonfinite_step_changes_no_shard(tmp_path):
    """Measured from the local shards; the skip with the fused AdamW (found_inf), with an
    unfused one and with Muon (snapshot and torch.where on the shards)."""
    proc = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests" / "fsdp_rank.py"), str(tmp_path),
         *sets("train.threads=1", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
               "train.batch_size=4", "train.grad_accum=2", "train.device='cpu'", FSDP)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for kind in ("params", "state"):
        total = ranks[0][f"{kind}_total"]
        assert sum(r[f"{kind}_local"] for r in ranks) == total
        for r in ranks:
            assert 0.45 <= r[f"{kind}_local"] / total <= 0.55, (kind, ranks)
    assert all(r["sharded"] and r["fused_skip"] and r["unfused_skip"] and r["muon_skip"] for r in ranks), ranks


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    """With dropout on, so the recomputed forward must replay the same masks."""
    steps = ["train.max_steps=6", "train.grad_accum=2", "model.dropout=0.1", "train.eval_interval=3"]
    single(tmp_path / "plain", *steps)
    single(tmp_path / "ac", *steps, "train.activation_checkpointing=true")
    assert_close(losses(tmp_path / "ac"), losses(tmp_path / "plain"), 1e-6)
    assert_close(evals(tmp_path / "ac"), evals(tmp_path / "plain"), 1e-6)


def test_accelerate_launch_with_fsdp_trains_sharded(tmp_path):
    """The launcher's FSDP settings become the run's: bf16 (FSDP's mixed precision), CPU offload
    and activation checkpointing, on 2 ranks; the training still learns."""
    accelerate = [*ACCELERATE[:2], "--use_fsdp", "--fsdp_version", "2", "--fsdp_activation_checkpointing", "true",
                  "--fsdp_offload_params", "true", "--mixed_precision", "bf16", *ACCELERATE[3:]]
    proc = launch(accelerate, tmp_path / "acc", "train.max_steps=6", "train.grad_accum=2")
    line = "  parallel: fsdp over 2 ranks (reshard after forward, bf16 weights / fp32 reduce, CPU offload, activation checkpointing)"
    assert line in proc.stdout.splitlines(), proc.stdout
    [start] = [e for e in events(tmp_path / "acc") if e["event"] == "run_start"]
    assert start["parallel"] == "fsdp" and start["world_size"] == 2
    trained = losses(tmp_path / "acc")
    assert len(trained) == 6 and trained[6] < trained[1] - 0.05, trained


@pytest.mark.parametrize("flags, words", [
    (["--use_fsdp"], "asks for FSDP version 1, which trainctl does not support"),
    (["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP"], "auto wrap policy SIZE_BASED_WRAP"),
])
def test_accelerate_settings_trainctl_does_not_support_are_one_line_and_exit_2(tmp_path, flags, words):
    proc = subprocess.run(
        [*ACCELERATE[:2], *flags, *ACCELERATE[3:], "-m", "trainctl", "run", "--yes", "--out", str(tmp_path / "o"),
         *sets(*SAME, "train.max_steps=2")],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("trainctl: error:")]
    assert len(errors) == 1 and words in errors[0], output[-3000:]
    assert "exitcode: 2" in output and proc.returncode != 0, output[-3000:]
    assert not (tmp_path / "o" / "events.jsonl").exists()


# --- the launcher's environment, mapped (pure) ------------------------------------------------

LAUNCHED = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
            "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "false",
            "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false", "FSDP_FORWARD_PREFETCH": "false",
            "ACCELERATE_MIXED_PRECISION": "no"}


def test_the_launchers_requests_fill_the_train_table():
    raw: dict = {}
    assert apply(raw, LAUNCHED | {"FSDP_OFFLOAD_PARAMS": "true", "FSDP_RESHARD_AFTER_FORWARD": "false",
                                  "ACCELERATE_MIXED_PRECISION": "bf16"}) == []
    assert raw["train"] == {"parallel": "fsdp", "fsdp_reshard_after_forward": False, "cpu_offload": True,
                            "activation_checkpointing": False, "dtype": "bfloat16"}
    # accelerate's defaults are exported whether asked for or not: they yield to the config
    raw = {"train": {"fsdp_reshard_after_forward": False, "activation_checkpointing": True}}
    apply(raw, LAUNCHED)
    assert raw["train"]["fsdp_reshard_after_forward"] is False and raw["train"]["activation_checkpointing"] is True
    assert apply({}, {}) == [] and apply({}, {"ACCELERATE_MIXED_PRECISION": "no"}) == []
    warned = apply({}, LAUNCHED | {"FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"})
    assert len(warned) == 2 and "LlamaDecoderLayer" in warned[0]


@pytest.mark.parametrize("config, extra, words", [
    ({"parallel": "ddp"}, {}, "train.parallel = 'ddp' in the config, but accelerate launch asks for 'fsdp'"),
    ({"cpu_offload": False}, {"FSDP_OFFLOAD_PARAMS": "true"}, "train.cpu_offload = False in the config"),
    ({"dtype": "float32"}, {"ACCELERATE_MIXED_PRECISION": "bf16"}, "train.dtype = 'float32' in the config"),
    ({}, {"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "sharding strategy HYBRID_SHARD"),
    ({}, {"FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true"}, "activation checkpointing with offload"),
    ({}, {"FSDP_FORWARD_PREFETCH": "true"}, "explicit forward prefetch"),
    ({}, {"FSDP_OFFLOAD_PARAMS": "maybe"}, "FSDP_OFFLOAD_PARAMS='maybe'"),
    ({}, {"ACCELERATE_MIXED_PRECISION": "fp8"}, "fp8 mixed precision"),
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
])
def test_conflicts_and_unsupported_launcher_settings_are_one_line(config, extra, words):
    with pytest.raises(ConfigError) as err:
        apply({"train": dict(config)}, LAUNCHED | extra)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_config_error_for_fsdp_settings_names_the_key():
    proc = run_cli("run", "--yes", "--dry-run", "--set", "train.cpu_offload=true")
    assert proc.returncode == 2 and "train.parallel = 'fsdp'" in proc.stderr, proc.stderr
    proc = run_cli("run", "--yes", "--dry-run", "--set", "train.parallel='zero3'")
    assert proc.returncode == 2 and "train.parallel must be one of 'ddp', 'fsdp'" in proc.stderr, proc.stderr


# --- hf --------------------------------------------------------------------------------------

HF_FSDP_TOLERANCE = 1e-4  # float32 on CPU; measured largest differences are printed


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_two_ranks_fsdp_equal_one_process(hf, tmp_path, lora):
    steps = ["train.max_steps=4", "plugin.lr.warmup_steps=1", "train.eval_interval=2", *OBSERVED[:1],
             "plugin.layer_stats.every=2", "plugin.samples.every=4", "plugin.samples.max_new_tokens=4"]
    if lora:
        # with activation checkpointing (per decoder layer) on both sides: recomputed forwards in the sharded layers
        steps += ["hf.lora.r=4", "hf.lora.target_modules=['q_proj', 'v_proj']", "train.activation_checkpointing=true"]
    base = hf.sets(None, *steps)
    run_cli("run", "--yes", "--backend", "hf", "--out", str(tmp_path / "one"), *sets(*base), check=True, timeout=300)
    for steps in (2, 4):  # the checkpoint at step 2 (gathered weights or adapter) resumes into the shards
        proc = subprocess.run(
            [*TORCHRUN, "-m", "trainctl", "run", "--yes", "--backend", "hf", "--out", str(tmp_path / "fsdp"),
             *sets(*base, FSDP, f"train.max_steps={steps}")],
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    starts = [e for e in events(tmp_path / "fsdp") if e["event"] == "run_start"]
    assert starts[1]["resumed_from"].endswith("step-000002")
    one, fsdp = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    print(f"hf {'lora' if lora else 'full'} fsdp 2 ranks vs 1 process, largest step-loss difference:",
          max(abs(one[k] - fsdp[k]) for k in one))
    assert_close(fsdp, one, HF_FSDP_TOLERANCE)
    assert_close(evals(tmp_path / "fsdp"), evals(tmp_path / "one"), HF_FSDP_TOLERANCE)
    assert "parallel: fsdp over 2 ranks" in proc.stdout
    stats_one, stats_fsdp = notices(tmp_path / "one", "layer_stats"), notices(tmp_path / "fsdp", "layer_stats")
    assert sorted(stats_fsdp) == [2, 4]
    for step in stats_fsdp:
        assert_close(stats_fsdp[step], stats_one[step], HF_FSDP_TOLERANCE)
    assert sorted(notices(tmp_path / "fsdp", "samples")) == [2, 4]  # each leg's end; both ranks in lockstep


def test_muon_under_fsdp_equals_one_process_bit_for_bit(tmp_path):
    """Muon orthogonalises each whole matrix, gathered from the row shards. With one micro-batch
    a rank the gradients are one process's bit for bit (a sum of two terms has one order), so the
    losses are too; torch.optim.Muon on the shards leaves them by 6e-5 here. Its sharded momentum
    travels through the distributed checkpoint: FSDP on 2 ranks to step 5, resumed to 10. Clipping
    is off: the global gradient norm of the shards (their norms all-reduced) sums in another order
    than one process's and differs in its last bit (0.9406242 vs 0.9406241 at step 5 here), which a
    clipped step carries into the update."""
    common = ["optim.name='muon'", "train.grad_accum=2", "optim.lr=1e-3", "optim.muon_lr=0.02", "train.grad_clip=0"]
    single(tmp_path / "one", *common, "train.max_steps=10")
    launch(TORCHRUN, tmp_path / "fsdp", *common, FSDP, "train.max_steps=5")
    launch(TORCHRUN, tmp_path / "fsdp", *common, FSDP, "train.max_steps=10")
    one, fsdp = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert len(one) == 10 and fsdp == one
    starts = [e for e in events(tmp_path / "fsdp") if e["event"] == "run_start"]
    assert starts[1]["resumed_from"].endswith("step-000005")


def test_compiled_blocks_under_fsdp_train_as_one_eager_process(tmp_path):
    """``train.compile`` with FSDP: each block compiled before it is sharded (FSDP's hooks stay
    outside the graphs), 2 ranks, against one eager process. Inductor's CPU kernels fuse and
    round differently from eager, so the bar is 1e-4, not equality."""
    steps = ["train.max_steps=4", "train.grad_accum=2"]
    single(tmp_path / "eager", *steps)
    launch(TORCHRUN, tmp_path / "compiled", *steps, FSDP, "train.compile=true", timeout=600)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    print("gpt compiled fsdp 2 ranks vs eager 1 process, largest step-loss difference:",
          max(abs(eager[k] - compiled[k]) for k in eager))
    assert len(eager) == 4
    assert_close(compiled, eager, 1e-4)


def test_the_plans_parallel_line_says_what_runs_where():
    import torch

    from trainctl.backends.parallel import describe
    from trainctl.kernel.schema import TrainConfig

    plain, fsdp = TrainConfig(), TrainConfig(parallel="fsdp", cpu_offload=True, activation_checkpointing=True)
    assert describe(plain, 1, torch.float32) == "one process"
    assert describe(plain, 2, torch.float32) == "ddp over 2 ranks"
    assert describe(fsdp, 2, torch.bfloat16) == (
        "fsdp over 2 ranks (reshard after forward, bf16 weights / fp32 reduce, CPU offload, activation checkpointing)")
