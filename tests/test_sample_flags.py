"""``trainctl sample --no-chat-template`` and ``--greedy``, through the real CLI on real
checkpoints, against what transformers alone generates from the same directory."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_GPT, run_cli
from tests.test_hf_trl_user import cli_run, reference_reply

PROMPT = "Who speaks?"
SEP = "\n---------------\n"


@pytest.fixture(scope="module")
def chat_run(hf, tmp_path_factory):
    """A two-step hf run on conversations: its tokenizer has a chat template."""
    out = tmp_path_factory.mktemp("chat") / "run"
    proc = cli_run(hf, out, hf.messages, 'plugins=["lr", "checkpoint"]', "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr
    return out


def sample(*args):
    proc = run_cli("sample", *args, "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.rstrip("\n")


def greedy_reference(checkpoint, prompt, *, chat):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_no_chat_template_continues_the_prompt_as_plain_text(chat_run):
    checkpoint = chat_run / "checkpoints" / "step-000002"
    plain = sample(str(chat_run), "--prompt", PROMPT, "--no-chat-template")
    assert plain == PROMPT + reference_reply(checkpoint, PROMPT, chat=False)  # the tokenizer's template unused
    chat = sample(str(chat_run), "--prompt", PROMPT)
    assert chat == reference_reply(checkpoint, PROMPT, chat=True) and chat != plain  # the default still asks the chat


@pytest.mark.parametrize("plain", [False, True], ids=["chat", "plain"])
def test_greedy_is_transformers_do_sample_false(chat_run, plain):
    checkpoint = chat_run / "checkpoints" / "step-000002"
    flags = ["--no-chat-template"] if plain else []
    first, second = sample(str(chat_run), "--prompt", PROMPT, "--greedy", "--num-samples", "2", *flags).split(SEP)
    want = greedy_reference(checkpoint, PROMPT, chat=not plain)
    assert first == second == ((PROMPT + want) if plain else want)  # seeds 0 and 1: the same argmax path
    assert sample(str(chat_run), "--prompt", PROMPT, "--greedy", "--seed", "7", *flags) == first
    sampled = sample(str(chat_run), "--prompt", PROMPT, "--num-samples", "2", *flags).split(SEP)
    assert sampled[0] != sampled[1]  # without --greedy the seeds differ: the test can fail


def test_greedy_on_a_gpt_checkpoint(tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_GPT, "train.max_steps=4", "train.eval_interval=0", 'plugins=["lr", "checkpoint"]']
    proc = run_cli("run", "--backend", "gpt", "--yes", "--out", str(out), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr
    first, second = sample(str(out), "--prompt", "ROMEO:", "--greedy", "--num-samples", "2").split(SEP)
    assert first == second and first.startswith("ROMEO:") and len(first) > len("ROMEO:")
    sampled = sample(str(out), "--prompt", "ROMEO:", "--num-samples", "2", "--temperature", "2.0").split(SEP)
    assert sampled[0] != sampled[1]
