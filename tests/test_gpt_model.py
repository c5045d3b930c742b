import io
import math

import pytest
import torch

from trainctl.backends.gpt.model import GPT, GPTConfig
from trainctl.backends.optim import CombinedOptimizer, build_optimizer
from trainctl.kernel.errors import ConfigError

LR = 1e-3
MUON_LR = 0.02


def tiny_config() -> GPTConfig:
    return GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config())


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 65, (4, 17), generator=g)
    return data[:, :-1], data[:, 1:]


def optimizer(model: GPT, name: str) -> torch.optim.AdamW | CombinedOptimizer:
    return build_optimizer(
        model, name=name, lr=LR, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
        device_type="cpu", muon_lr=MUON_LR, muon_momentum=0.95, muon_weight_decay=0.01,
    )


def train_steps(model: GPT, opt: torch.optim.AdamW | CombinedOptimizer, steps: int) -> list[float]:
    x, y = batch()
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_forward_shapes_and_initial_loss() -> None:
    model = tiny_model()
    x, y = batch()
    logits, loss = model(x, y)
    assert logits.shape == (4, 16, 65)
    assert loss is not None and loss.shape == ()
    # near-uniform predictions at init
    assert abs(loss.item() - math.log(65)) < 0.3

    logits, loss = model(x)
    assert logits.shape == (4, 1, 65)
    assert loss is None


def test_ignore_index_targets_are_skipped() -> None:
    model = tiny_model()
    x, y = batch()
    y_masked = y.clone()
    y_masked[:, 8:] = -1
    _, loss_masked = model(x, y_masked)
    logits, _ = model(x, y)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 65), y[:, :8].reshape(-1))
    assert loss_masked is not None
    torch.testing.assert_close(loss_masked, expected)


def test_weight_tying() -> None:
    model = tiny_model()
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_residual_projections_get_smaller_init() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=128, block_size=16, vocab_size=65))
    c_fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    c_proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert c_fc_std == pytest.approx(0.02, rel=0.05)
    assert c_proj_std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)


def test_num_params_and_flops_per_token() -> None:
    model = tiny_model()
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - cfg.block_size * cfg.n_embd
    flops = model.flops_per_token()
    head_size = cfg.n_embd // cfg.n_head
    assert flops > 0
    assert flops == 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_head * head_size * cfg.block_size


def test_generate_length_and_determinism() -> None:
    model = tiny_model().eval()
    prompt = torch.zeros((2, 3), dtype=torch.long)
    # 30 new tokens run past block_size=16, exercising the context crop
    a = model.generate(prompt, 30, top_k=10, generator=torch.Generator().manual_seed(42))
    b = model.generate(prompt, 30, top_k=10, generator=torch.Generator().manual_seed(42))
    c = model.generate(prompt, 30, top_k=10, generator=torch.Generator().manual_seed(43))
    assert a.shape == (2, 33)
    assert torch.equal(a[:, :3], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_crop_block_size() -> None:
    model = tiny_model()
    model.crop_block_size(8)
    assert model.config.block_size == 8
    assert model.transformer.wpe.weight.shape == (8, 32)
    logits, _ = model(torch.zeros((1, 8), dtype=torch.long))
    assert logits.shape == (1, 1, 65)
    with pytest.raises(AssertionError):
        model(torch.zeros((1, 9), dtype=torch.long))


def test_adamw_groups_split_decay_and_no_decay() -> None:
    model = tiny_model()
    opt = optimizer(model, "adamw")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    # per layer: 4 Linear weights; plus wte (tied to lm_head) and wpe
    assert len(decay["params"]) == 4 * 2 + 2
    # per layer: 4 Linear biases and 2 LayerNorms (weight, bias); plus ln_f
    assert len(no_decay["params"]) == 8 * 2 + 2
    n_decay = sum(p.numel() for p in decay["params"])
    n_no_decay = sum(p.numel() for p in no_decay["params"])
    assert n_decay + n_no_decay == model.num_params(non_embedding=False)
    assert decay["fused"] is True


def test_muon_groups() -> None:
    model = tiny_model()
    opt = optimizer(model, "muon")
    assert isinstance(opt, CombinedOptimizer)
    (muon_group,) = opt.muon.param_groups
    blocks_linear = {id(m.weight) for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in muon_group["params"]} == blocks_linear
    assert muon_group["lr"] == MUON_LR
    adamw_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert id(model.lm_head.weight) in adamw_ids
    assert id(model.transformer.wpe.weight) in adamw_ids
    assert not adamw_ids & blocks_linear
    n_total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_total == model.num_params(non_embedding=False)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_lr_scale_drives_every_group(name: str) -> None:
    model = tiny_model()
    opt = optimizer(model, name)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert all(g["lr"] == pytest.approx(LR * g["lr_scale"]) for g in opt.param_groups)
    assert scales[:2] == [1.0, 1.0]
    if name == "muon":
        assert scales[2] == pytest.approx(MUON_LR / LR)
    # the trainer's schedule: a zero learning rate must freeze every parameter
    for g in opt.param_groups:
        g["lr"] = 0.0 * g["lr_scale"]
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unknown_optimizer_name() -> None:
    with pytest.raises(ConfigError, match="optim.name must be one of 'adamw', 'muon', 'sgd'"):
        optimizer(tiny_model(), "lion")


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_training_reduces_loss(name: str) -> None:
    model = tiny_model()
    losses = train_steps(model, optimizer(model, name), 10)
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_resume_from_state_dict_is_bit_identical(name: str) -> None:
    model = tiny_model()
    opt = optimizer(model, name)
    train_steps(model, opt, 6)

    interrupted = tiny_model()
    opt_interrupted = optimizer(interrupted, name)
    train_steps(interrupted, opt_interrupted, 3)
    buf = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optim": opt_interrupted.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)

    resumed = tiny_model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = optimizer(resumed, name)
    opt_resumed.load_state_dict(checkpoint["optim"])
    train_steps(resumed, opt_resumed, 3)

    for (key, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, actual), key
