"""NEFTune (``[hf] neftune_noise_alpha``, Jain et al. 2023): uniform noise of magnitude
``alpha / sqrt(seq_len * hidden)`` added to the input embeddings in training forwards.

The hook is transformers' own (``transformers.integrations.neftune``), attached to the same
module as ``Trainer.train()`` attaches it (the base model's input embeddings, under LoRA too),
so the noise is TRL's. The hook checks ``module.training``: evaluation and ``generate`` (both
run the model in eval mode) see the embeddings unchanged. The noise draws from torch's global
generator on the embeddings' device, which is the stream a checkpoint's RNG files carry, so a
resumed run draws the noise an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any


def activate(model: Any, alpha: float) -> Any:
    """Attach NEFTune with ``alpha`` to ``model`` (a transformers model, or a peft model over
    one) after it is built; the hook's handle, or None when ``alpha`` is 0 (off) or the model's
    embeddings already carry the hook (a second call must not add the noise twice)."""
    from transformers.integrations.neftune import activate_neftune
    from transformers.trainer_utils import _is_peft_model

    if not alpha:  # the schema keeps it >= 0
        return None
    base = model.base_model.model if _is_peft_model(model) else model  # where activate_neftune looks
    if getattr(base.get_input_embeddings(), "neftune_noise_alpha", None) is not None:
        return None
    return activate_neftune(model, alpha)
