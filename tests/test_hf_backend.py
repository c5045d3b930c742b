"""The hf backend under the real kernel: packing without cross-document attention, exact resume,
control, non-finite steps skipped on the device, Muon's parameter split, LoRA, vision freezing,
and the loss against TRL's own ``compute_loss``."""

from __future__ import annotations

import json

import torch

from tests import hf_assets
from tests.conftest import make_config
from tests.recording_plugins import INSTANCES
from trainctl.kernel.run import Run


def session(registry, hf, out, *extra, data=None, resume="never"):
    return Run(make_config(registry, out, *hf.sets(data, *extra), backend="hf"), registry, resume=resume)


def losses(out):
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["event"] == "step" and e["loss"] is not None}


def test_bfd_packing_keeps_documents_apart(registry, hf, tmp_path):
    s = session(registry, hf, tmp_path / "out", "plugins=[]", "data.packing='bfd'", "data.mask='none'", data=hf.text)
    b = s.backend
    row = next(r for r in b.sft.rows("train", list(range(len(b.sft.train)))) if len(r["seq_lengths"]) >= 3)
    inputs = b.sft.batch([row]).inputs  # TRL's padding-free batch: position_ids restart per document
    assert "attention_mask" not in inputs and inputs["input_ids"].shape[0] == 1
    model = b.model.eval()
    with torch.no_grad():
        packed = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[0]
        start, alone = 0, []
        for n in row["seq_lengths"]:
            ids = torch.tensor([row["input_ids"][start : start + n]])
            alone.append(model(input_ids=ids, use_cache=False).logits[0])
            start += n
        assert (packed - torch.cat(alone)).abs().max() < 1e-5
        # the loss path (TRL's fused head) equals the documents' losses computed one by one
        fused = model(**inputs, use_cache=False, fused_lm_head=True).log_probs.sum()
        start, separate = 0, 0.0
        for n in row["seq_lengths"]:
            doc = torch.tensor([row["input_ids"][start : start + n]])
            separate += model(input_ids=doc, labels=doc, use_cache=False, fused_lm_head=True).log_probs.sum()
            start += n
        assert abs(float(fused - separate)) < 1e-3
        # the test can fail: with a cache object the model no longer sees the documents apart
        leaky = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=True).logits[0]
        assert (leaky - torch.cat(alone)).abs().max() > 1e-3


def test_resume_equals_an_uninterrupted_run(registry, hf, tmp_path):
    common = ("data.packing='bfd'", "train.max_steps=8", "plugin.lr.warmup_steps=2", "train.eval_interval=0")
    full = tmp_path / "full"
    whole = session(registry, hf, full, 'plugins=["lr", "checkpoint", "jsonl"]', *common)
    assert whole.fit().status == "completed"

    split = tmp_path / "split"
    first = session(registry, hf, split, 'plugins=["lr", "checkpoint", "jsonl", "script"]', *common,
                    "plugin.script.stop_at=[4]")
    assert first.fit().step == 4
    second = session(registry, hf, split, 'plugins=["lr", "checkpoint", "jsonl"]', *common, resume="auto")
    assert second.resumed_from.endswith("step-000004")
    assert second.fit().status == "completed"

    for a, b in zip(whole.backend.model.parameters(), second.backend.model.parameters()):
        assert torch.equal(a, b)
    ref, resumed = losses(full), losses(split)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert abs(ref[step] - resumed[step]) < 1e-6
    files = {p.name for p in (split / "checkpoints" / "step-000004").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "rng-rank0.pt", "trainer_state.json"} <= files
    from transformers import AutoModelForCausalLM  # the checkpoint is a plain HF model directory

    reloaded = AutoModelForCausalLM.from_pretrained(split / "checkpoints" / "step-000008")
    assert torch.equal(reloaded.lm_head.weight, second.backend.base.lm_head.weight)


def test_control_stop_and_save(registry, hf, tmp_path):
    out = tmp_path / "out"
    s = session(registry, hf, out, 'plugins=["checkpoint", "script", "recorder"]', "train.max_steps=10",
                "plugin.script.save_at=[2]", "plugin.script.stop_at=[3]", "plugin.script.reason='request'")
    result = s.fit()
    assert result.status == "stopped" and result.step == 3
    saves = [(e.step, e.reason) for e in INSTANCES["recorder"].events if type(e).__name__ == "CheckpointSaved"]
    assert saves == [(2, "request"), (3, "request")]
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_non_finite_steps_are_skipped_bit_identically(registry, hf, tmp_path):
    for optimizer in ("adamw", "muon"):
        b = session(registry, hf, tmp_path / optimizer, "plugins=[]", f"optim.name='{optimizer}'").backend
        b.set_lr(3e-3)
        b.train_step(0)
        params = [p.detach().clone() for p in b.params]
        tensors = [v.clone() for o in _parts(b) for s in o.state.values() for v in s.values()]
        poison = b.base.get_input_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))
        out = b.train_step(1)
        poison.remove()
        assert bool(out.skipped) and not torch.isfinite(out.loss)
        assert all(torch.equal(a, p) for a, p in zip(params, b.params)), optimizer
        after = [v for o in _parts(b) for s in o.state.values() for v in s.values()]
        assert all(torch.equal(x, y) for x, y in zip(tensors, after)) and len(tensors) == len(after)
        out = b.train_step(2)
        assert not bool(out.skipped) and not all(torch.equal(a, p) for a, p in zip(params, b.params))


def _parts(backend):
    from trainctl.backends.finite_update import parts

    return parts(backend.optimizer)


def test_muon_takes_hidden_matrices_and_adamw_the_head(registry, hf, tmp_path):
    b = session(registry, hf, tmp_path / "out", "plugins=[]", "optim.name='muon'").backend
    muon = {id(p) for g in b.optimizer.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in b.optimizer.adamw.param_groups for p in g["params"]}
    assert id(b.base.lm_head.weight) in adamw and id(b.base.get_input_embeddings().weight) in adamw
    assert id(b.base.model.layers[0].self_attn.q_proj.weight) in muon
    assert len(muon) == 2 * 7 and not muon & adamw  # 7 projections per layer, 2 layers


def test_lora_trains_the_adapter_only_and_resumes(registry, hf, tmp_path):
    out = tmp_path / "out"
    lora = ("hf.lora.r=4", "hf.lora.alpha=8", 'hf.lora.target_modules=["q_proj", "v_proj"]')
    s = session(registry, hf, out, 'plugins=["checkpoint", "script"]', "train.max_steps=6", *lora,
                "plugin.script.stop_at=[3]")
    b = s.backend
    assert s.plan.params == 2 * 4 * ((64 + 64) + (64 + 32))  # 2 layers x r x (in + out) of q and v
    base_before = b.base.model.layers[0].mlp.up_proj.weight.detach().clone()
    lora_before = b.base.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach().clone()
    assert s.fit().step == 3
    assert torch.equal(base_before, b.base.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(lora_before, b.base.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    files = {p.name for p in (out / "checkpoints" / "step-000003").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    resumed = session(registry, hf, out, 'plugins=["checkpoint"]', "train.max_steps=6", *lora, resume="auto")
    for a, c in zip(b.params, resumed.backend.params):
        assert torch.equal(a, c)
    assert resumed.fit().step == 6


def test_vision_language_checkpoint_trains_text_with_the_tower_frozen(registry, hf, tmp_path):
    vl = tmp_path / "vl"
    hf_assets.build_vision_model(vl, hf.tokenizer)
    s = session(registry, hf, tmp_path / "out", "plugins=[]", f"model.name_or_path='{vl}'", "train.max_steps=2")
    b = s.backend
    tower = b.base.get_encoder(modality="image")
    assert type(b.base).__name__ == "Qwen3VLForConditionalGeneration"
    assert all(not p.requires_grad for p in tower.parameters())
    assert s.plan.params == sum(p.numel() for p in b.base.model.language_model.parameters()) + b.base.lm_head.weight.numel()
    before = [p.detach().clone() for p in tower.parameters()]
    assert s.fit().status == "completed"
    assert all(torch.equal(a, p) for a, p in zip(before, tower.parameters()))


def test_loss_is_trls_compute_loss(registry, hf, tmp_path):
    b = session(registry, hf, tmp_path / "out", "plugins=[]", "data.packing='bfd'").backend
    batches = b._step_batches(0)
    n = sum(x.trained for x in batches)
    ours = sum(float(b._loss(b.model, (x, n, n), False).share.detach()) for x in batches)
    trl = sum(float(b.sft.trainer.compute_loss(b.model, dict(x.inputs), num_items_in_batch=n).detach()) for x in batches)
    assert abs(ours - trl) < 1e-6


def test_loss_terms_generate_and_layer_stats(registry, hf, tmp_path):
    s = session(registry, hf, tmp_path / "out", 'plugins=["z_loss"]', "train.max_steps=2")
    b = s.backend
    out = b.train_step(0)
    assert set(out.metrics) == {"z_loss", "num_tokens"} and float(out.metrics["z_loss"]) > 0  # computed on the logits
    plain = session(registry, hf, tmp_path / "plain", "plugins=[]").backend.train_step(0)
    assert {"entropy", "mean_token_accuracy", "num_tokens"} <= set(plain.metrics)  # TRL's names
    # the step loss includes the term (as gpt's does); without it, it is the same SFT loss
    assert abs(float(out.loss - out.metrics["z_loss"]) - float(plain.loss)) < 1e-5
    stats = b.layer_stats()
    assert {"layer.0.weight_norm", "layer.1.grad_norm", "embedding.weight_norm", "head.grad_norm"} <= set(stats)
    rng = torch.get_rng_state()
    text = b.generate("Speak.", max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    assert isinstance(text, str) and text == b.generate("Speak.", max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    assert torch.equal(rng, torch.get_rng_state()) and b.model.training
