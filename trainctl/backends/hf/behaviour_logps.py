"""The behaviour policy's log-probs of the tokens it generated (TRL's ``sampling_per_token_logps``),
recorded from transformers' ``generate`` as it runs instead of by one more forward pass over the
finished completions.

``generate`` runs one forward per new token; the logits of forward i give the distribution token
i was drawn from, and forward i + 1's input ends with token i (with the KV cache its input is
that token alone; without it, the whole sequence). So a forward hook keeps the last position's
logits until the next forward names the token, and the last token is taken from the returned
completion. The log-prob is TRL's ``selective_log_softmax(logits, token, temperature)``: the
trainer's own ``_get_per_token_logps_and_entropies`` (logits / temperature over the whole
vocabulary), only computed from the cached forward; the two agree to float32 rounding
(tests/test_grpo_async.py compares them).

The recorder wraps the generator trainer's ``_generate_single_turn``, the method whose second
result TRL defines as the generated tokens' log-probs (its vLLM path returns them; the
``generate`` path returns None): TRL then pads them into the batch's ``sampling_per_token_logps``
and splits them into micro-batches with the rest of the generation. Only a generator that runs
alone uses it (the off-policy producers refuse several ranks): under FSDP's ``synced_gpus`` a rank
that has finished keeps running forwards, which this count would take for tokens.
"""

from __future__ import annotations

from typing import Any

import torch


class _Recorder:
    """Forward-hook state for one ``generate`` call."""

    def __init__(self, temperature: float) -> None:
        from trl.trainer.utils import selective_log_softmax

        self.log_softmax, self.temperature = selective_log_softmax, temperature
        self.pending: torch.Tensor | None = None  # (B, V): the last forward's logits, its token not yet known
        self.taken: list[torch.Tensor] = []  # (B,) per generated token but the last

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self.pending is not None:
            token = kwargs["input_ids"][:, -1]
            self.taken.append(self.log_softmax(self.pending, token, temperature=self.temperature))
        self.pending = output.logits[:, -1, :]

    def logps(self, completions: list[list[int]]) -> list[list[float]]:
        """Each completion's log-probs; ``completions`` as TRL returns them (cut after the first EOS)."""
        assert self.pending is not None, "generate ran no forward"
        steps = len(self.taken) + 1
        if max(map(len, completions)) != steps:
            raise RuntimeError(f"generate ran {steps} forwards for completions of up to {max(map(len, completions))} "
                               "tokens: the behaviour log-probs cannot be matched to the tokens")
        last = torch.tensor([ids[-1] if len(ids) == steps else 0 for ids in completions], device=self.pending.device)
        rows = torch.stack([*self.taken, self.log_softmax(self.pending, last, temperature=self.temperature)], dim=1)
        return [row[:len(ids)] for row, ids in zip(rows.tolist(), completions)]  # one host sync a generation


def record(trainer: Any, model: Any) -> None:
    """Make ``trainer`` (TRL's ``GRPOTrainer`` of a generator) return the behaviour log-probs from
    its generation; ``model`` is the module whose ``generate`` TRL calls."""
    single_turn = trainer._generate_single_turn

    def generate_single_turn(prompt_ids: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        recorder = _Recorder(trainer.temperature)
        hook = model.register_forward_hook(recorder, with_kwargs=True)
        try:
            completion_ids, _ = single_turn(prompt_ids, *args, **kwargs)
        finally:
            hook.remove()
        return completion_ids, recorder.logps(completion_ids)

    trainer._generate_single_turn = generate_single_turn
