"""The ``hf`` model's memory from its ``config.json`` alone (``AutoConfig``, no weights read, no
model built): the input to the memory plan (``trainctl/backends/memory.py``).

The shape is a Llama-style decoder (what nearly every current causal LM is): attention with
``num_key_value_heads`` (GQA), a gated MLP of ``intermediate_size`` (two matrices for the
GPT-2/NeoX families), RMSNorms, untied or tied embeddings. A vision tower (image-text-to-text
checkpoints) is left out: it is frozen and runs on no training token. Rows are counted at
``model.max_length`` tokens: exact with packing, an upper bound without it (a batch is padded
to its longest row only). DPO (``[hf] objective = "dpo"``) runs a pair's chosen and rejected rows
in one forward (twice the rows of the micro-batch) and, with the reference held as a copy, a
frozen second model (``frozen``: the starting weights, or ``hf.dpo.ref_model``'s). GRPO
(``"grpo"``) trains micro-batches of prompt + completion rows (prompts counted at
``model.max_length`` tokens), holds a frozen reference copy when ``beta`` > 0 without LoRA (with
LoRA the reference is the adapters switched off), and while generating the KV cache of a whole
generation batch (``train.batch_size x steps_per_generation`` rows, as TRL generates them at
once); synchronously the policy generates with its own weights, and with ``max_staleness`` > 0
the generator's copy and the staging copy it takes weights from are two more frozen models (none
with ``rollout_workers``: the workers hold theirs in their own processes). A
reward model (``hf.grpo.reward_model``) counts its weights, in the policy's dtype, from its
config.json read as ``reward_model.check`` reads it (its scoring forward runs under inference
mode and is left out).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from trainctl.backends import memory
from trainctl.backends.hf.config import HFConfig, resolve_reference
from trainctl.backends.memory import MemoryEstimate, ModelShape
from trainctl.kernel.backend import BackendContext

NON_GATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: rows of the fused LM head's tile (TRL's ``_CHUNKED_LOGPROB_CHUNK_SIZE``): the logits exist a
#: tile at a time, never as (B, T, V)
LOGITS_TILE = 32768
#: host memory of transformers, TRL's SFTTrainer, tokenizers and the rows' Arrow tables beyond
#: what torch itself needs: measured here with the tiny test model and 64 rows (~160 MiB; bench/
#: memory_plan.py). It grows with the data, which the plan does not read: a floor, not a bound.
PIPELINE = 160 * 2**20


def estimate(ctx: BackendContext) -> MemoryEstimate:
    """One rank's memory for this run from the model's config: nothing is loaded but config.json."""
    from trainctl.backends.device import Placement
    from trainctl.backends.hf import loading

    cfg, hf = ctx.model, ctx.sections.get("hf") or HFConfig()
    text = loading.model_config(cfg).get_text_config()
    placement = Placement.of(ctx.train, ctx.dist.local_rank)
    device, dtype = placement.names
    attn = loading.attention(cfg.attn_implementation, placement.device)
    lora = hf.lora
    dpo = hf.objective == "dpo"
    rows = ctx.train.batch_size * (2 if dpo else 1)  # DPO: a pair's chosen and rejected rows in one forward
    s = shape(text, tokens=rows * cfg.max_length, batch=rows, seq=cfg.max_length,
              dtype=dtype, lora_r=lora.r if lora else 0, lora_targets=lora.target_modules if lora else (),
              attention=attn, packing=ctx.data.packing)
    if dpo and resolve_reference(hf.dpo.reference, lora is not None, bool(hf.dpo.ref_model)) == "copy":
        ref = shape(loading.model_config(replace(cfg, name_or_path=hf.dpo.ref_model)).get_text_config(), tokens=1, batch=1,
                    seq=1, dtype=dtype) if hf.dpo.ref_model else s
        s = replace(s, frozen=ref.params - (s.trained if lora and not hf.dpo.ref_model else 0),
                    what_frozen=f"DPO's reference model ({ref.params:,} parameters)",
                    fix_frozen='hf.dpo.reference = "precomputed" (its log-probs computed once, before training), '
                               '[hf.lora] with reference "adapters_off", or shard over more ranks')
    if hf.objective == "grpo":
        s = _grpo(ctx, cfg, hf, text, dtype, attn)
    return memory.estimate(s, optimizer=ctx.optim.name, strategy=_strategy(ctx, cfg.gradient_checkpointing),
                           device=device, param_bytes=2 if cfg.dtype in ("bfloat16", "float16") else 4)


def _grpo(ctx: BackendContext, cfg: Any, hf: HFConfig, text: Any, dtype: str, attn: str) -> ModelShape:
    opts, lora = hf.grpo, hf.lora
    seq = cfg.max_length + opts.max_completion_length
    rows = ctx.train.batch_size
    s = shape(text, tokens=rows * seq, batch=rows, seq=seq, dtype=dtype, lora_r=lora.r if lora else 0,
              lora_targets=lora.target_modules if lora else (), attention=attn)
    _, L, _, kv, hd, _, _ = _dims(text)
    generation = rows * (opts.steps_per_generation or ctx.train.grad_accum)
    elt = 4 if dtype == "float32" else 2
    s = replace(s, cache=2 * L * kv * hd * generation * seq * elt,
                what_cache=f"the KV cache of {generation} generated rows of up to {seq} tokens",
                fix_cache="lower hf.grpo.max_completion_length, model.max_length, train.batch_size or "
                          "hf.grpo.steps_per_generation")
    frozen, what = [], []
    if opts.beta > 0 and lora is None:
        frozen.append(s.params)
        what.append(f"GRPO's reference model ({s.params:,} parameters, hf.grpo.beta > 0)")
    if opts.max_staleness and not opts.rollout_workers:  # the generator's policy copy, and the staging copy publish() fills
        frozen.append(2 * s.params)
        what.append(f"the generator's policy copy and its staging copy (2 x {s.params:,} parameters, "
                    f"hf.grpo.max_staleness = {opts.max_staleness})")
    if frozen:
        s = replace(s, frozen=sum(frozen), what_frozen=" and ".join(what),
                    fix_frozen="hf.grpo.beta = 0 (no KL term, TRL's default), hf.grpo.max_staleness = 0 (the policy "
                               "generates itself), [hf.lora] (the reference is the adapters switched off) or shard "
                               "over more ranks")
    if "model" in opts.rewards and opts.reward_model:
        params = _reward_model_params(opts.reward_model, dtype)
        s = replace(s, scorer=params, what_scorer=f"the reward model {opts.reward_model} ({params:,} parameters)")
    return s


def _reward_model_params(folder: str, dtype: Any) -> int:
    """The reward model's parameters, from its config.json as ``reward_model.check`` reads it: the
    decoder's and the score head (hidden -> 1), not an LM head."""
    from transformers import AutoConfig

    from trainctl.backends.hf import reward_model

    checked = reward_model.check(folder)
    fields = {k: v for k, v in checked.config.items() if k != "model_type"}
    c = AutoConfig.for_model(checked.config["model_type"], **fields).get_text_config()
    rm = shape(c, tokens=1, batch=1, seq=1, dtype=dtype)
    H, V = c.hidden_size, c.vocab_size
    return rm.params - (0 if getattr(c, "tie_word_embeddings", False) else V * H) + H


def _strategy(ctx: BackendContext, gradient_checkpointing: bool) -> memory.Strategy:
    strategy = memory.Strategy.of(ctx.train, ctx.dist.world_size)
    return replace(strategy, activation_checkpointing=strategy.activation_checkpointing or gradient_checkpointing)


def _dims(c: Any) -> tuple[int, int, int, int, int, int, int]:
    H, L, nh = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or nh
    hd = getattr(c, "head_dim", None) or H // nh
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * H
    return H, L, nh, kv, hd, inter, c.vocab_size


def shape(c: Any, *, tokens: int, batch: int, seq: int, dtype: str, lora_r: int = 0,
          lora_targets: tuple[str, ...] = (), attention: str = "sdpa", packing: str | bool = False) -> ModelShape:
    """The memory shape of the decoder config ``c`` at micro-batches of ``batch`` x ``seq``.

    The attention mask is saved for backward by every layer under SDPA and eager attention
    (counted with saved_tensors_hooks on the tiny test model): (B, 1, T, T) for padded rows,
    (1, 1, B·T, B·T) for BFD packing, which flattens the batch into one padding-free row, none for
    wrapped packing (full rows, causal only) or flash attention (varlen kernels). Eager attention
    also keeps the (B, nh, T, T) softmax and its input."""
    H, L, nh, kv, hd, inter, V = _dims(c)
    gated = c.model_type not in NON_GATED
    linears = {  # (in, out) of each projection of one layer
        "q_proj": (H, nh * hd), "k_proj": (H, kv * hd), "v_proj": (H, kv * hd), "o_proj": (nh * hd, H),
        "up_proj": (H, inter), "down_proj": (inter, H),
    } | ({"gate_proj": (H, inter)} if gated else {})
    block = sum(i * o for i, o in linears.values()) + 2 * H + (2 * hd if c.model_type.startswith("qwen3") else 0)
    head = 0 if getattr(c, "tie_word_embeddings", False) else V * H
    params = V * H + head + L * block + H
    targets = set(linears) if "all-linear" in lora_targets else {t for t in lora_targets if t in linears}
    adapters = L * sum(lora_r * (i + o) for name, (i, o) in linears.items() if name in targets) if lora_r else 0
    elt = 4 if dtype == "float32" else 2
    # per token per layer, saved for backward: two RMSNorms (fp32 input, normalised, output: 3H
    # each), q/k/v after RoPE and k/v repeated to every head (GQA), SDPA's output and o_proj's
    # input (2H), the residual (H), and the MLP's gate, up, activation and product (4I)
    saved = (9 * H + 3 * nh * hd + 2 * kv * hd + (4 if gated else 2) * inter) * elt + nh * 4
    if lora_r:
        saved += len(targets) * lora_r * elt  # each adapter's A output
    tile = min(tokens, LOGITS_TILE)
    masked = attention in ("sdpa", "eager") and packing != "wrapped"
    mask = (tokens * tokens if packing == "bfd" else batch * seq * seq) * elt if masked else 0
    attention = mask + (2 * batch * nh * seq * seq * elt if attention == "eager" else 0)
    return ModelShape(
        params=params + adapters, trained=adapters or params, hidden_matrices=adapters or L * (block - 2 * H),
        block_params=block, layers=L, tokens=tokens,
        saved_per_token_layer=saved, checkpointed_per_token_layer=H * elt, attention_per_layer=attention,
        other_saved_per_token=3 * H * 4 + 8 * 3,  # the final norm; input ids, labels, positions
        logits=tile * V * 4 * 3,  # one tile of fp32 logits, its softmax and gradient
        what_activations=f"max_length {seq} x batch {batch}",
        fix_activations="lower model.max_length or train.batch_size (raise train.grad_accum to keep the batch)",
        checkpointing_key="model.gradient_checkpointing",
        model_fix="a smaller model or LoRA ([hf.lora])",
        pipeline=PIPELINE,
    )
