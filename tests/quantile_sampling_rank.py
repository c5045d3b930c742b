"""``python tests/quantile_sampling_rank.py ARGS``: ``trainctl ARGS`` with generation's sampling made
deterministic and independent of how the batch is split over ranks, so that 2 ranks can be held
to one process's numbers.

Why sampling cannot be compared as it is: TRL seeds every process differently
(``set_seed(seed, device_specific=True)`` in ``GRPOTrainer.__init__``: seed + process index, so
that ranks do not draw duplicate completions), and one process draws all of a generation's
tokens from one stream where 2 ranks draw halves of it from two; the completions, and so every
number after them, differ. Greedy decoding (``top_k = 1``) is no way out: the completions of a
group are then identical, group-normalised advantages add up to zero over them, and the policy
gradient vanishes (the run would compare zeros).

Here transformers' ``torch.multinomial`` draw becomes inverse-CDF sampling at a fixed quantile
per completion of its group (row ``i`` of a generation batch, ``i mod num_generations``): each
completion is a function of its prompt and its place in the group alone, the completions of a
group differ, and the draw is the same whichever rank makes it.

With ``QUANTILE_EOS`` set (the tokenizer's end-of-sequence id), a drawn token that is a multiple of
``QUANTILE_EOS_EVERY`` is replaced by it: completions end early, at places that depend on the
prompt, so the ranks' generations have different lengths (what FSDP generation must survive:
every rank runs the forwards of the longest)."""

from __future__ import annotations

import os
import runpy
import sys

import torch
import transformers.generation.utils as generation

GROUP = int(os.environ["QUANTILE_GROUP"])  # hf.grpo.num_generations
EOS = int(os.environ.get("QUANTILE_EOS", "-1"))
EOS_EVERY = int(os.environ.get("QUANTILE_EOS_EVERY", "5"))
QUANTILES = torch.tensor([(i + 0.5) / GROUP for i in range(GROUP)], dtype=torch.float64)


def quantile_draw(probs: torch.Tensor, num_samples: int = 1, **_: object) -> torch.Tensor:
    """(B, V) probabilities -> (B, 1) tokens: the first whose cumulative probability reaches the row's quantile."""
    assert num_samples == 1 and probs.size(0) % GROUP == 0, (num_samples, probs.shape)
    cdf = probs.double().cumsum(-1)  # (B, V)
    u = QUANTILES.repeat(probs.size(0) // GROUP).unsqueeze(1) * cdf[:, -1:]  # (B, 1)
    drawn = torch.searchsorted(cdf, u).clamp(max=probs.size(1) - 1)
    return drawn if EOS < 0 else torch.where(drawn % EOS_EVERY == 0, EOS, drawn)


class _Torch:
    """``torch`` as transformers' generation module sees it, with the draw replaced."""

    def __getattr__(self, name: str) -> object:
        return quantile_draw if name == "multinomial" else getattr(torch, name)


generation.torch = _Torch()
sys.argv[0] = "trainctl"
runpy.run_module("trainctl", run_name="__main__", alter_sys=True)
