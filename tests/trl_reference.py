"""TRL's own scripts as the reference run: ``python -m tests.trl_reference sft|dpo CONFIG.yaml OUT.json``
runs ``trl/scripts/sft.py`` (or ``dpo.py``) as ``trl sft --config CONFIG.yaml`` runs it in its one
process, parsing the YAML with TRL's own parser, and writes the Trainer's ``log_history`` (every
logged step's loss, grad_norm and learning_rate, and every eval_loss, unrounded) to OUT.json.
The only addition is reading ``trainer.state.log_history`` when ``train()`` returns (the console
shows the same values rounded to four digits)."""

from __future__ import annotations

import json
import runpy
import sys


def main(script: str, config: str, out: str) -> None:
    import trl

    trainer_cls = {"sft": trl.SFTTrainer, "dpo": trl.DPOTrainer}[script]
    train = trainer_cls.train

    def train_and_record(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(self.state.log_history, f)
        return result

    trainer_cls.train = train_and_record
    sys.argv = [f"trl {script}", "--config", config]
    runpy.run_module(f"trl.scripts.{script}", run_name="__main__")


if __name__ == "__main__":
    main(*sys.argv[1:4])
