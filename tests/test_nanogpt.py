"""nanoGPT compatibility: `init_from` a nanoGPT ckpt.pt (its layout written here) and
`trainctl config import-nanogpt` of a nanoGPT config file (parsed, never executed)."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from tests.conftest import TINY_GPT, make_config, run_cli
from tests.live import sets
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run

FAST = [*TINY_GPT, "train.threads=1", "plugin.lr.warmup_steps=2"]


def write_nanogpt_ckpt(path, session, *, iter_num=30, compiled=True, old_mask=True) -> dict:
    """nanoGPT's train.py layout: model (maybe compiled), model_args, optimizer, iter_num,
    best_val_loss, config."""
    model = session.backend.raw_model
    a = session.backend.model_args
    prefix = "_orig_mod." if compiled else ""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if old_mask:  # older nanoGPT registered the causal mask as a buffer in every block
        mask = torch.tril(torch.ones(a.block_size, a.block_size)).view(1, 1, a.block_size, a.block_size)
        for i in range(a.n_layer):
            state[f"{prefix}transformer.h.{i}.attn.bias"] = mask
    model_args = dict(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.block_size,
                      bias=a.bias, vocab_size=a.vocab_size, dropout=a.dropout)
    ckpt = {
        "model": state, "model_args": model_args, "optimizer": session.backend.optimizer.state_dict(),
        "iter_num": iter_num, "best_val_loss": torch.tensor(1.234),
        "config": {"batch_size": 8, "learning_rate": 3e-3, "dataset": "shakespeare_char", "compile": compiled,
                   "wandb_log": False, "betas": [0.9, 0.99]},
    }
    torch.save(ckpt, path)
    return model_args


def test_init_from_a_nanogpt_ckpt(registry, tmp_path):
    trained = Run(make_config(registry, tmp_path / "a", *FAST, "train.max_steps=30", "train.eval_steps=2",
                              'plugins=["lr", "jsonl"]', backend="gpt"), registry, resume="never")
    result = trained.fit()
    ckpt = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(ckpt, trained)

    out = tmp_path / "b"
    proc = run_cli("run", "--yes", "--out", str(out), *sets(*FAST, f"model.init_from='{ckpt}'", "train.max_steps=3",
                   "train.eval_steps=2", "train.eval_at_start=true"), check=True)
    assert f"init_from: weights of nanoGPT {ckpt} (iter 30)" in proc.stdout
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    first_val = next(e["loss"] for e in events if e["event"] == "eval" and e["split"] == "val")
    assert first_val == result.val_loss  # the very weights: the same evaluation, bit for bit

    # shorter context than the checkpoint's: the position table is cropped, as nanoGPT does
    short = Run(make_config(registry, tmp_path / "c", *FAST, f"model.init_from='{ckpt}'", "model.block_size=16",
                            backend="gpt"), registry, resume="never")
    wpe = trained.backend.raw_model.transformer.wpe.weight
    assert torch.equal(short.backend.raw_model.transformer.wpe.weight, wpe[:16])


def test_init_from_with_another_shape_names_the_difference(registry, tmp_path):
    source = Run(make_config(registry, tmp_path / "a", *FAST, backend="gpt"), registry, resume="never")
    ckpt = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(ckpt, source, compiled=False, old_mask=False)
    with pytest.raises(ConfigError) as info:
        Run(make_config(registry, tmp_path / "b", *FAST, "model.n_layer=3", "model.n_embd=48",
                        f"model.init_from='{ckpt}'", backend="gpt"), registry, resume="never")
    assert str(info.value) == (
        f"model.init_from {ckpt}: model.n_layer is 2 in the checkpoint but 3 here; "
        "model.n_embd is 32 in the checkpoint but 48 here; set the checkpoint's values in [model]"
    )


def test_init_from_refuses_a_pickle_with_code(registry, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": {}, "payload": _Evil(str(marker))}, evil)
    with pytest.raises(ConfigError, match="refused, it holds more than tensors and plain values"):
        Run(make_config(registry, tmp_path / "b", *FAST, f"model.init_from='{evil}'", backend="gpt"), registry, resume="never")
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


NANOGPT_CONFIG = '''# train a miniature character-level shakespeare model
out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often
always_save_checkpoint = False
wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small
warmup_iters = 100 # not super necessary potentially
device = 'cpu'
compile = False
import os
os.system("touch {marker}")
evil = __import__("os").system("touch {marker}")
flavour = 'vanilla'
'''


def test_config_import_nanogpt(tmp_path):
    marker = tmp_path / "PWNED"
    source = tmp_path / "train_shakespeare_char.py"
    source.write_text(NANOGPT_CONFIG.format(marker=marker))
    target = tmp_path / "converted.toml"
    proc = run_cli("config", "import-nanogpt", str(source), "-o", str(target), check=True)
    assert not marker.exists()  # parsed, never executed
    notes = proc.stderr.splitlines()
    assert f"trainctl: {source}: line 26: skipped a statement that is not `name = value`: import os" in notes
    assert any("line 27: skipped a statement" in n and "os.system" in n for n in notes)
    assert any("line 28: skipped evil: its value is not a literal" in n for n in notes)
    assert f"trainctl: {source}: flavour: unknown nanoGPT setting, not converted" in notes
    assert any(n.endswith("wandb_log: not converted (enable the wandb plugin instead)") for n in notes)

    converted = tomllib.loads(target.read_text())
    assert converted["train"] == {
        "out_dir": "out-shakespeare-char", "eval_interval": 250, "log_interval": 10, "eval_steps": 200,
        "grad_accum": 1, "batch_size": 64, "max_steps": 5000, "grad_clip": 1.0, "device": "cpu",
        "compile": False, "run_name": "mini-gpt", "eval_at_start": True,
    }
    assert converted["optim"] == {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99}
    assert converted["model"] == {"block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2,
                                  "bias": False, "init_from": "scratch"}
    assert converted["data"] == {"path": "data/shakespeare_char"}
    assert converted["plugin"]["lr"] == {"warmup_steps": 100, "decay_steps": 5000, "min_lr": 1e-4, "schedule": "cosine"}
    assert converted["plugin"]["checkpoint"] == {"save_best": True}  # always_save_checkpoint = False

    shown = run_cli("config", "show", str(target), check=True)  # a valid trainctl config
    assert tomllib.loads(shown.stdout)["model"]["n_embd"] == 384
    to_stdout = run_cli("config", "import-nanogpt", str(source), check=True)
    assert tomllib.loads(to_stdout.stdout) == converted


def test_a_nanogpt_data_directory_with_meta_pkl(registry, tmp_path):
    """nanoGPT's data/shakespeare_char/prepare.py writes train.bin, val.bin (uint16) and meta.pkl."""
    import pickle

    import numpy as np

    from trainctl.backends.gpt.data import embedded_text

    text = embedded_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    data = tmp_path / "shakespeare_char"
    data.mkdir()
    n = int(0.9 * len(ids))
    ids[:n].tofile(data / "train.bin")
    ids[n:].tofile(data / "val.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}))

    session = Run(make_config(registry, tmp_path / "o", *FAST, f"data.path='{data}'", "train.max_steps=3",
                              'plugins=["lr"]', backend="gpt"), registry, resume="never")
    assert session.backend.tokenizer.decode(session.backend.tokenizer.encode("ROMEO:")) == "ROMEO:"
    assert session.backend.model_args.vocab_size == 65 and session.fit().status == "completed"

    marker = tmp_path / "PWNED"
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": _Evil(str(marker))}))
    with pytest.raises(ConfigError, match="meta.pkl: refused: the pickle names posix.system"):
        Run(make_config(registry, tmp_path / "p", *FAST, f"data.path='{data}'", backend="gpt"), registry, resume="never")
    assert not marker.exists()
