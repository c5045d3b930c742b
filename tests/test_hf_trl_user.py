"""What a TRL user expects of the hf backend, through the real CLI: base-model tokenizers (no chat
template), TRL's learning-rate schedules and losses, epochs, hub dataset ids, the plan's counts
and ``trainctl sample`` on hf checkpoints."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli

STEPS, WARMUP, BATCH, ACCUM, MAX_LENGTH, LR, SEED = 6, 2, 4, 2, 128, 3e-3, 1234


def cli_run(hf, out, data, *sets, config="hf_tiny.toml", extra=()):
    base = [f"model.name_or_path={hf.llama}", f"data.train={data}", "train.log_interval=1", "train.eval_interval=0"]
    return run_cli("run", str(ROOT / "configs" / config), "--yes", "--out", str(out), *extra,
                   *[a for s in (*base, *sets) for a in ("--set", s)])


def events(out, kind="step"):
    return [e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_messages_with_a_tokenizer_without_chat_template_is_one_line(hf, tmp_path):
    proc = cli_run(hf, tmp_path / "out", hf.messages, f"model.tokenizer={hf.plain_tokenizer}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert ("the tokenizer has no chat template and the messages rows are conversations, which need one; "
            "set model.chat_template") in proc.stderr
    assert "internal error" not in proc.stderr
    # plain strings, but a mask that needs the template's assistant turns: the same one line
    masked = cli_run(hf, tmp_path / "out2", hf.prompt_completion, f"model.tokenizer={hf.plain_tokenizer}",
                     "data.mask='assistant_only'")
    assert masked.returncode == 2 and masked.stderr.strip().count("\n") == 0, masked.stderr
    assert "the tokenizer has no chat template and data.mask = assistant_only needs one" in masked.stderr


def trl_losses(hf, data, out, **overrides):
    """A plain ``SFTTrainer.train()`` on the same rows, model, order, schedule and optimizer."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Record(TrainerCallback):
        losses: list[float] = []
        lrs: list[float] = []

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in logs:
                self.losses.append(logs["loss"])
                self.lrs.append(logs["learning_rate"])

    torch.set_num_threads(1)
    args = SFTConfig(
        output_dir=str(out), use_cpu=True, bf16=False, seed=SEED, max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_length=MAX_LENGTH, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=WARMUP, weight_decay=0.0, adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch_fused",
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, log_level="error",
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    record = Record()
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32, attn_implementation="sdpa"),
                         args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(hf.plain_tokenizer), callbacks=[record])
    trainer.train()
    return record.losses, record.lrs


def test_plain_prompt_completion_without_chat_template_trains_as_trl_does(hf, tmp_path):
    out = tmp_path / "ours"
    proc = cli_run(
        hf, out, hf.prompt_completion, f"model.tokenizer={hf.plain_tokenizer}", f"seed={SEED}",
        f"train.max_steps={STEPS}", f"train.batch_size={BATCH}", f"train.grad_accum={ACCUM}", f"model.max_length={MAX_LENGTH}",
        "data.packing=false", "data.shuffle=false", "data.val_fraction=0.0", f"optim.lr={LR}", "optim.beta2=0.999",
        "plugin.lr.schedule='cosine'", "plugin.lr.family='transformers'", f"plugin.lr.warmup_steps={WARMUP}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "loss mask: completion_only" in proc.stdout
    ours = events(out)
    theirs, lrs = trl_losses(hf, hf.prompt_completion, tmp_path / "trl")
    assert len(theirs) == len(ours) == STEPS
    assert [e["lr"] for e in ours] == pytest.approx(lrs, rel=1e-9, abs=1e-15)
    assert [e["loss"] for e in ours] == theirs  # bit-identical, step by step


def test_epochs_with_trls_short_last_step_match_sft_trainer(hf, tmp_path):
    from tests import hf_assets

    # 62 rows, 4 per micro-batch, 3 per step: 16 micro-batches (the last of 2 rows), so each
    # epoch is 6 steps and its last step is one micro-batch of 2 rows, as Trainer cuts it
    data = hf_assets.write_jsonl(tmp_path / "pc.jsonl", hf_assets.prompt_completion_rows(62))
    out = tmp_path / "ours"
    proc = cli_run(
        hf, out, data, f"model.tokenizer={hf.plain_tokenizer}", f"seed={SEED}", "data.epochs=2",
        "data.epoch_end='short_step'", f"train.batch_size={BATCH}", "train.grad_accum=3", f"model.max_length={MAX_LENGTH}",
        "data.packing=false", "data.shuffle=false", "data.val_fraction=0.0", f"optim.lr={LR}", "optim.beta2=0.999",
        "plugin.lr.schedule='linear'", "plugin.lr.family='transformers'", "plugin.lr.warmup_ratio=0.1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "run length: 12 steps (data.epochs = 2) x 12 rows = 2.00 epochs of 62 rows" in proc.stdout
    ours = events(out)
    theirs, lrs = trl_losses(hf, data, tmp_path / "trl", max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=3,
                             lr_scheduler_type="linear", warmup_steps=0.1)
    assert [e["max_steps"] for e in ours] == [12] * 12 and len(theirs) == 12
    assert [e["lr"] for e in ours] == pytest.approx(lrs, rel=1e-9, abs=1e-15)
    assert [e["loss"] for e in ours] == theirs
    # the short steps trained fewer tokens: steps 6 and 12 hold 2 rows each
    assert ours[5]["tokens"] - ours[4]["tokens"] < (ours[4]["tokens"] - ours[3]["tokens"]) / 2


def test_epochs_carry_on_by_default_and_set_the_run_length(hf, tmp_path):
    out = tmp_path / "ours"
    proc = cli_run(hf, out, hf.prompt_completion, f"model.tokenizer={hf.plain_tokenizer}", "data.epochs=1.5",
                   "data.packing=false", "data.val_fraction=0.0", 'plugins=["lr", "checkpoint", "jsonl"]')
    assert proc.returncode == 0, proc.stderr
    # 64 rows, 4 x 2 per step: 8 steps an epoch, 12 for 1.5; hf_tiny's max_steps (20) is replaced
    assert "x 12 steps (fresh start)" in proc.stdout
    assert 'run length: 12 steps (data.epochs = 1.5) x 8 rows = 1.50 epochs of 64 rows; steps run over' in proc.stdout
    steps = events(out)
    assert [e["step"] for e in steps] == list(range(1, 13)) and {e["max_steps"] for e in steps} == {12}
    assert events(out, "run_end")[0]["status"] == "completed"
    again = cli_run(hf, out, hf.prompt_completion, f"model.tokenizer={hf.plain_tokenizer}", "data.epochs=1.5",
                    "data.packing=false", "data.val_fraction=0.0", 'plugins=["lr", "checkpoint", "jsonl"]')
    assert again.returncode == 0 and "already finished 12 steps (train.max_steps = 12)" in again.stdout, again.stderr


def test_plan_counts_rows_after_trls_preparation(hf, tmp_path):
    from tests import hf_assets

    rows = hf_assets.prompt_completion_rows(64)
    long = [{"prompt": "Speak. " * 200, "completion": "No."}] * 2  # prompts fill max_length: TRL drops them
    data = hf_assets.write_jsonl(tmp_path / "pc.jsonl", rows[:10] + long + rows[10:])
    out = tmp_path / "ours"
    proc = cli_run(hf, out, data, f"model.tokenizer={hf.plain_tokenizer}", "data.epochs=1", "data.packing=false",
                   "data.val_fraction=0.0", 'plugins=["lr", "checkpoint", "jsonl"]', "optim.beta2=0.99")
    assert proc.returncode == 0, proc.stderr
    assert ("data: prompt_completion: 66 train rows, 64 kept, 2 dropped by TRL (nothing left to train after "
            "truncation to max_length); no validation rows") in proc.stdout
    assert "run length: 8 steps (data.epochs = 1) x 8 rows = 1.00 epochs of 64 rows" in proc.stdout
    per_epoch = int(proc.stdout.split("trained tokens: ")[1].split(" per epoch")[0].replace(",", ""))
    assert events(out, "run_end")[0]["tokens"] == per_epoch  # exactly one epoch's trained tokens
    assert "betas (0.9, 0.99), weight decay 0, eps 1e-08 (TRL's defaults: beta2 0.999)" in proc.stdout
    assert "lr schedule: cosine (nanoGPT's), warmup 2 steps\n" in proc.stdout


def reference_reply(checkpoint, prompt, *, chat, seed=0, max_new_tokens=12):
    """What transformers alone generates from the checkpoint directory, seeded as sample is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=True, temperature=0.8, top_k=200, top_p=None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["chat", "base", "lora"])
def test_sample_reads_hf_checkpoints(hf, tmp_path, kind):
    out = tmp_path / "run"
    data, sets = hf.messages, ['plugins=["lr", "checkpoint"]', "train.max_steps=2"]
    if kind == "base":
        data = hf.prompt_completion
        sets.append(f"model.tokenizer={hf.plain_tokenizer}")
    if kind == "lora":
        sets += ["hf.lora.r=4", 'hf.lora.target_modules=["q_proj"]']
    assert cli_run(hf, out, data, *sets).returncode == 0
    proc = run_cli("sample", str(out), "--prompt", "Who speaks?", "--max-new-tokens", "12", "--num-samples", "2")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.rstrip("\n").split("\n---------------\n")
    checkpoint = out / "checkpoints" / "step-000002"
    if kind == "lora":  # the adapter over its base, merged, generates the same text
        from peft import AutoPeftModelForCausalLM

        merged = tmp_path / "merged"
        AutoPeftModelForCausalLM.from_pretrained(checkpoint).merge_and_unload().save_pretrained(merged)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(merged)
        checkpoint = merged
    chat = kind != "base"
    want = reference_reply(checkpoint, "Who speaks?", chat=chat)
    assert first == (want if chat else "Who speaks?" + want)  # a base model's text continues the prompt
    again = reference_reply(checkpoint, "Who speaks?", chat=chat, seed=1)  # --num-samples: seeds 0, 1, ...
    assert second == (again if chat else "Who speaks?" + again)


def cache_hub_dataset(cache, repo, splits):
    """Put ``repo`` into a datasets cache as ``load_dataset`` leaves it after a download
    (``owner___name/default/0.0.0/<hash>/name-<split>.arrow``), built by datasets' own json
    builder: the offline path of ``load_dataset`` then reads it like any cached hub dataset."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    owner, name = repo.split("/")
    builder = Json(cache_dir=str(cache / "build"), dataset_name=name, hash="0123456789abcdef",
                   data_files={split: str(path) for split, path in splits.items()})
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / "default" / "0.0.0"
    target.mkdir(parents=True)
    shutil.move(builder.cache_dir, target / "0123456789abcdef")


def test_hub_dataset_ids_load_from_the_cache_offline(hf, tmp_path):
    import subprocess
    import sys

    from tests import hf_assets
    from tests.conftest import cli_env

    train = hf_assets.write_jsonl(tmp_path / "train.jsonl", hf_assets.prompt_completion_rows(40))
    test = hf_assets.write_jsonl(tmp_path / "test.jsonl", hf_assets.prompt_completion_rows(60)[40:])
    cache = tmp_path / "datasets-cache"
    cache_hub_dataset(cache, "someone/capy", {"train": train, "test": test})
    env = cli_env() | {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def run(*sets):
        args = ["run", str(ROOT / "configs" / "hf_tiny.toml"), "--dry-run", "--out", str(tmp_path / "out"),
                *[a for s in (f"model.name_or_path={hf.llama}", f"model.tokenizer={hf.plain_tokenizer}",
                              "data.packing=false", *sets) for a in ("--set", s)]]
        return subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    ok = run("data.train=someone/capy", "data.val=someone/capy")  # val_split defaults to "test"
    assert ok.returncode == 0, ok.stderr
    assert "fine-tuned on someone/capy" in ok.stdout
    assert "data: prompt_completion: 40 train rows, 40 kept; 20 val rows from data.val" in ok.stdout
    swapped = run("data.train=someone/capy", "data.split=test", "data.val_fraction=0.0")
    assert swapped.returncode == 0 and "20 train rows, 20 kept" in swapped.stdout
    for sets, message in [
        (["data.train=nobody/no-such-dataset"], "data.train 'nobody/no-such-dataset' is not a local path and not in "
                                                 "the datasets cache (offline: HF_HUB_OFFLINE is set)"),
        (["data.train=someone/capy", "data.split=validation"], "data.train 'someone/capy': Unknown split \"validation\""),
        (["data.train=./no/such.jsonl"], "does not exist; check the path"),
    ]:
        proc = run(*sets)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_import_trl_config_trains_what_trl_trains(hf, tmp_path):
    """A ``trl sft --config`` YAML converted by ``config import-trl``, run by trainctl, against
    TRL's SFTTrainer built from the same YAML: every step's learning rate and loss."""
    import yaml

    from tests import hf_assets

    data = hf_assets.write_jsonl(tmp_path / "pc.jsonl", hf_assets.prompt_completion_rows(30))
    settings = {
        "model_name_or_path": str(hf.llama), "dataset_name": str(data), "seed": SEED, "learning_rate": LR,
        "num_train_epochs": 2, "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 3,
        "max_length": MAX_LENGTH, "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": 0.2, "logging_steps": 1, "use_cpu": True, "save_strategy": "no", "optim": "adamw_torch_fused",
        "train_sampling_strategy": "sequential", "report_to": "none", "bf16": False,
    }
    source = tmp_path / "sft.yaml"
    source.write_text(yaml.safe_dump(settings))
    target = tmp_path / "sft.toml"
    proc = run_cli("config", "import-trl", str(source), "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert "report_to: not converted" in proc.stderr
    out = tmp_path / "ours"
    run = run_cli("run", str(target), "--yes", "--out", str(out), "--set", f"model.tokenizer={hf.plain_tokenizer}",
                  "--set", "train.threads=1")
    assert run.returncode == 0, run.stderr
    # 30 rows in micro-batches of 4 (8, the last of 2) grouped 3 a step: 3 steps an epoch, 6 for 2
    assert "run length: 6 steps (data.epochs = 2) x 12 rows = 2.00 epochs of 30 rows; each epoch ends with a shorter step" in run.stdout
    ours = events(out)
    trl_args = {k: v for k, v in settings.items() if k not in ("model_name_or_path", "dataset_name", "report_to")}
    theirs, lrs = trl_losses(hf, data, tmp_path / "trl", max_steps=-1, **trl_args)
    assert len(ours) == len(theirs) == 6
    assert [e["lr"] for e in ours] == pytest.approx(lrs, rel=1e-9, abs=1e-15)
    assert [e["loss"] for e in ours] == theirs


def test_import_trl_refuses_what_is_not_a_config(tmp_path):
    for text, message in [("- a\n- b\n", "a trl config is a mapping"), ("a: [1,\n", "not valid YAML"),
                          ("!!python/object/apply:os.system ['echo no']\n", "not valid YAML"),
                          ("num_train_epochs: three\n", "num_train_epochs: expected a number")]:
        source = tmp_path / "bad.yaml"
        source.write_text(text)
        proc = run_cli("config", "import-trl", str(source))
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_trl_defaults_are_trls():
    import dataclasses

    from trl import ModelConfig, ScriptArguments, SFTConfig

    from trainctl.backends.hf.trl_config import TRL_DEFAULTS

    fields = {f.name: f.default for cls in (SFTConfig, ModelConfig, ScriptArguments) for f in dataclasses.fields(cls)}
    assert fields["bf16"] is None and not fields["fp16"]  # None: TRL's __post_init__ makes it "not fp16", so True
    fields["bf16"] = True
    for name, value in TRL_DEFAULTS.items():
        assert fields[name] in (value, None if name == "output_dir" else value), name  # output_dir: None = trainer_output


@pytest.mark.parametrize("name", ["hf_sft.toml", "hf_tiny.toml"])
def test_shipped_hf_configs_write_out_the_defaults_that_differ_from_trls(name):
    import tomllib

    from trainctl.backends.hf.plan import TRL_BETA2, TRL_WEIGHT_DECAY

    config = tomllib.loads((ROOT / "configs" / name).read_text())
    assert config["optim"]["beta2"] == TRL_BETA2 and config["optim"]["weight_decay"] == TRL_WEIGHT_DECAY
    assert "val_fraction" in config["data"] and "warmup_steps" in config["plugin"]["lr"]


def test_sample_still_reads_gpt_checkpoints(tmp_path):
    from tests.conftest import TINY_GPT

    sets = [*TINY_GPT, "train.max_steps=3", "train.threads=1", "plugin.lr.warmup_steps=1", 'plugins=["lr", "checkpoint"]']
    run = run_cli("run", "--yes", "--out", str(tmp_path), *[a for s in sets for a in ("--set", s)])
    assert run.returncode == 0, run.stderr
    proc = run_cli("sample", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout.rstrip("\n")) == len("ROMEO:") + 20  # characters
