"""NEFTune (``[hf] neftune_noise_alpha``): transformers' hook, as TRL attaches it."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_config
from tests.test_hf_trl_user import ACCUM, BATCH, LR, MAX_LENGTH, SEED, STEPS, WARMUP, trl_losses
from trainctl.backends.hf import neftune
from trainctl.kernel.run import Run

ALPHA = 5.0
SETS = [f"seed={SEED}", f"train.max_steps={STEPS}", f"train.batch_size={BATCH}", f"train.grad_accum={ACCUM}",
        f"model.max_length={MAX_LENGTH}", "data.packing=false", "data.shuffle=false", "data.val_fraction=0.0",
        f"optim.lr={LR}", "optim.beta2=0.999", "plugin.lr.schedule='cosine'", "plugin.lr.family='transformers'",
        f"plugin.lr.warmup_steps={WARMUP}", 'plugins=["lr", "jsonl"]', "train.eval_interval=0"]


def session(registry, hf, out, *extra, chat=False):
    data = hf.sets(hf.messages) if chat else hf.sets(hf.prompt_completion, f"model.tokenizer='{hf.plain_tokenizer}'")
    sets = [*data, *SETS, *extra]
    return Run(make_config(registry, out, *sets, backend="hf"), registry)


def step_losses(out):
    return [e["loss"] for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == "step"]


def trainers_first_step_rng():
    """The CPU generator as ``Trainer.train()`` leaves it at its first step (sequential order):
    ``set_seed(seed)`` (trainctl's setup ends there too: SFTTrainer's constructor seeds it), then
    the one int64 the DataLoader's iterator draws for its workers' base seed
    (``_BaseDataLoaderIter.__init__``). trainctl's backend does not make that draw, so the test
    makes it; if the backend ever does, this function must go."""
    torch.manual_seed(SEED)
    torch.empty((), dtype=torch.int64).random_()


def test_noise_is_trls_step_for_step(registry, hf, tmp_path):
    run = session(registry, hf, tmp_path / "ours", f"hf.neftune_noise_alpha={ALPHA}")
    neftune.activate(run.backend.model, ALPHA)  # what setup's one line does (a no-op once setup has it)
    trainers_first_step_rng()
    run.fit()
    ours = step_losses(tmp_path / "ours")
    theirs, _ = trl_losses(hf, hf.prompt_completion, tmp_path / "trl", neftune_noise_alpha=ALPHA)
    quiet, _ = trl_losses(hf, hf.prompt_completion, tmp_path / "trl-off")
    assert len(ours) == len(theirs) == STEPS
    assert ours == theirs  # bit-identical, step by step
    assert all(a != b for a, b in zip(theirs, quiet))  # the noise changed every step: the test can fail


def test_noise_only_in_training_forwards(registry, hf, tmp_path):
    run = session(registry, hf, tmp_path / "ours", f"hf.neftune_noise_alpha={ALPHA}", "data.val_fraction=0.1", chat=True)
    backend = run.backend
    before_eval = backend.evaluate(0)
    before_text = backend.generate("Who speaks?", max_new_tokens=8, seed=3)
    assert neftune.activate(backend.model, ALPHA) is None  # setup attached it: a second call adds no second hook
    embeddings = backend.model.get_input_embeddings()
    assert len(embeddings._forward_hooks) == 1 and embeddings.neftune_noise_alpha == ALPHA
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    backend.model.eval()
    clean = embeddings(ids)
    backend.model.train()
    noisy = embeddings(ids)
    bound = ALPHA / (ids.shape[1] * clean.shape[-1]) ** 0.5  # alpha / sqrt(length x hidden)
    assert 0 < (noisy - clean).abs().max() <= bound
    after = backend.evaluate(0)
    assert {k: v.loss for k, v in after.items()} == {k: v.loss for k, v in before_eval.items()}
    assert backend.generate("Who speaks?", max_new_tokens=8, seed=3) == before_text
    assert backend.model.training  # evaluate and generate hand the model back in training mode
    assert neftune.activate(backend.model, 0.0) is None  # 0 = off
