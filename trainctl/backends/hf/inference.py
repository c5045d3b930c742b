"""Sampling from the model being trained and per-layer norms, for the plugins that ask
(``RunInfo.generate`` / ``RunInfo.layer_stats``). Neither touches the training RNG stream."""

from __future__ import annotations

from typing import Any

import torch

from trainctl.backends.layer_stats import group_norms


@torch.no_grad()
def generate(backend: Any, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int | None,
             seed: int, synced: bool = False) -> str:
    """Text after ``prompt``; a chat model (messages data) is asked through its chat template.
    ``synced``: every rank of a sharded model generates together."""
    model, tok = backend.model, backend.tokenizer
    if backend.shape == "text":
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    else:
        messages = [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    ids = ids.to(backend.device)
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(backend.device) if backend.device.type == "cuda" else None
    torch.manual_seed(seed)
    model.eval()
    try:
        sample = temperature > 0
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_k=top_k if sample else None, top_p=None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            use_cache=True,  # safe here: no packed rows in generation
            # FSDP: every rank generates; ranks that finish early keep forwarding until all have
            synced_gpus=synced,
        )
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, backend.device)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def layer_stats(model: Any) -> dict[str, float]:
    """``layer.N.weight_norm``/``grad_norm`` per decoder layer, ``embedding.*`` and ``head.*``."""
    groups = {f"layer.{i}": list(layer.parameters()) for i, layer in enumerate(getattr(model.get_decoder(), "layers", []))}
    groups["embedding"] = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None:
        groups["head"] = [head.weight]
    return group_norms(groups)
