"""The ``gpt`` model's memory from its ``[model]`` table alone (``model.py``'s shapes, counted
without building it): the input to the memory plan (``trainctl/backends/memory.py``)."""

from __future__ import annotations

from trainctl.backends import memory
from trainctl.backends.memory import MemoryEstimate, ModelShape
from trainctl.kernel.backend import BackendContext


def estimate(ctx: BackendContext) -> MemoryEstimate:
    """One rank's memory for this run, from its config and the data's vocabulary (memory-mapped
    metadata; the embedded corpus is decoded, ~0.3 s): nothing is allocated on the device."""
    from trainctl.backends.device import Placement
    from trainctl.backends.gpt import mixture

    m = ctx.model
    vocab = m.vocab_size or mixture.load(ctx.data, ctx.seed).vocab_size
    device, dtype = Placement.of(ctx.train, ctx.dist.local_rank).names
    s = shape(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size, vocab_size=vocab,
              bias=m.bias, dropout=m.dropout, batch_size=ctx.train.batch_size, device=device, dtype=dtype)
    return memory.estimate(s, optimizer=ctx.optim.name, strategy=memory.Strategy.of(ctx.train, ctx.dist.world_size),
                           device=device)


def block_params(C: int, bias: bool) -> int:
    """One Block: c_attn 3C², attn c_proj C², c_fc 4C², mlp c_proj 4C², two LayerNorm gains;
    with bias, 3C + C + 4C + C and two LayerNorm biases more."""
    return 12 * C * C + 2 * C + (11 * C if bias else 0)


def param_count(*, n_layer: int, n_embd: int, block_size: int, vocab_size: int, bias: bool) -> int:
    """``GPT.num_params(non_embedding=False)``: wte (tied with lm_head), wpe, the blocks, ln_f."""
    C = n_embd
    return vocab_size * C + block_size * C + n_layer * block_params(C, bias) + C + (C if bias else 0)


def saved_per_token_layer(C: int, n_head: int, elt: int) -> int:
    """Bytes one Block keeps for backward per token, from its forward (elements of width C):

        ln_1 input x (C) and output (C)          -> c_attn's input
        q, k, v (3C), SDPA's output (C) and its logsumexp (n_head, fp32)
        the heads re-assembled (C)              -> attn c_proj's input
        x + attn (C) and ln_2's output (C)      -> c_fc's input
        c_fc's output (4C)                      -> GELU's input
        GELU's output (4C)                      -> mlp c_proj's input

    17C in all (Korthikanti et al.'s 34·s·b·h bytes at 2 bytes). Under bf16 autocast the
    LayerNorms and the residual stream stay fp32 (4C of the 17C)."""
    if elt == 4:
        return 17 * C * 4 + n_head * 4
    return 13 * C * elt + 4 * C * 4 + n_head * 4


def shape(*, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int, bias: bool,
          dropout: float, batch_size: int, device: str, dtype: str) -> ModelShape:
    """The memory shape of a GPT trained on micro-batches of ``batch_size`` x ``block_size``."""
    C, T, B, V = n_embd, block_size, batch_size, vocab_size
    elt = 4 if dtype == "float32" else 2
    # SDPA's flash / memory-efficient kernels keep no (T, T) matrix; the math path does: CPU with
    # dropout (its flash kernel has none) and MPS. It saves the softmax, the dropped copy and
    # the dropout mask, (B, nh, T, T) each.
    math_path = device.startswith("mps") or (device.startswith("cpu") and dropout > 0)
    attention = B * n_head * T * T * (2 * elt + 1) if math_path else 0
    params = param_count(n_layer=n_layer, n_embd=C, block_size=T, vocab_size=V, bias=bias)
    return ModelShape(
        params=params, trained=params, hidden_matrices=n_layer * 12 * C * C, block_params=block_params(C, bias),
        layers=n_layer, tokens=B * T,
        saved_per_token_layer=saved_per_token_layer(C, n_head, elt),
        checkpointed_per_token_layer=C * 4,  # each block's input, the fp32 residual stream
        attention_per_layer=attention,
        other_saved_per_token=2 * C * 4 + 16,  # ln_f's input and output; the (B, T) int64 inputs and targets
        # (B, T, V) fp32: the logits and cross-entropy's log-softmax; in backward their gradients
        # take the place of freed buffers (measured: 2 copies at the peak, GPT-2 small at block 128)
        logits=B * T * V * 4 * 2,
        what_activations=f"block_size {T} x batch {B}",
        fix_activations="lower model.block_size or train.batch_size (raise train.grad_accum to keep the batch)",
        checkpointing_key="train.activation_checkpointing",
        model_fix="fewer model.n_layer / model.n_embd",
    )
