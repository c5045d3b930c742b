"""TRL's ``num_tokens`` step metric for the hf SFT backend, counted on the host."""

from __future__ import annotations

from typing import Any

import numpy as np


class InputTokens:
    """TRL's ``num_tokens``: the input tokens of every training micro-batch so far, padding left
    out (the collated ``attention_mask``'s sum, or the flattened length of a padding-free batch:
    either way the rows' lengths). Counted on the host from the prepared rows' lengths, so a
    resumed run counts the steps before it again without collating them."""

    def __init__(self, train: Any) -> None:
        import pyarrow.compute as pc

        self.lengths = np.asarray(pc.list_value_length(train.with_format("arrow")["input_ids"]), dtype=np.int64)
        self.step, self.total = 0, 0  # the total through step - 1

    def through(self, backend: Any, step: int) -> int:
        """The count after ``step`` (all ranks' micro-batches); ``backend``: the hf backend, whose
        ``layout`` says which rows each step trains."""
        if step != self.step:  # resumed (or a step out of order): count the steps before it again
            self.step, self.total = 0, 0
        while self.step <= step:
            self.total += int(sum(self.lengths[rows].sum() for rows in backend.layout.step(backend.sft, self.step)))
            self.step += 1
        return self.total
