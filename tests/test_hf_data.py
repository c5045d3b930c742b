"""The hf backend's data side: the three shapes, exact loss masks, the masking check, the
validation report and the fixed validation split. Runs set up the real backend (tiny model)."""

from __future__ import annotations

import json

import pytest

from tests import hf_assets
from tests.conftest import make_config
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run


def setup(registry, hf, tmp_path, data, *extra):
    config = make_config(registry, tmp_path / "out", *hf.sets(data, "data.val_fraction=0.0", *extra),
                         'plugins=[]', backend="hf")
    return Run(config, registry, resume="never")


def prepared(session, i):
    row = session.backend.sft.train[i]
    return row["input_ids"], row["labels"]


def trained_chars(tokenizer, ids, labels):
    return tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])


def test_text_rows_train_on_every_token_plus_eos(registry, hf, tmp_path):
    session = setup(registry, hf, tmp_path, hf.text)
    tok = session.backend.tokenizer
    first = json.loads(hf.text.read_text().splitlines()[0])["text"]
    ids, labels = prepared(session, 0)
    assert session.backend.shape == "text" and session.backend.mask == "none"
    assert ids == tok(first + "<|im_end|>")["input_ids"][:128] and labels == ids


def test_assistant_only_mask_is_exactly_the_assistant_turns(registry, hf, tmp_path):
    session = setup(registry, hf, tmp_path, hf.messages)
    tok = session.backend.tokenizer
    rows = [json.loads(line) for line in hf.messages.read_text().splitlines()]
    assert session.backend.mask == "assistant_only"
    for i in (0, 3, 7):  # row 3 has a system turn
        messages = rows[i]["messages"]
        text = tok.apply_chat_template(messages, tokenize=False)
        # expected from character offsets, independently of TRL's {% generation %} mechanism
        spans = []
        for m in messages:
            if m["role"] == "assistant":
                start = text.index("<|im_start|>assistant\n" + m["content"]) + len("<|im_start|>assistant\n")
                spans.append((start, start + len(m["content"]) + len("<|im_end|>")))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        expected = [t if any(a <= s and e <= b for a, b in spans) else -100
                    for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])][:128]
        ids, labels = prepared(session, i)
        assert ids == enc["input_ids"][:128]
        assert labels == expected
        assert trained_chars(tok, ids, labels).endswith("<|im_end|>")


def test_completion_only_mask_is_exactly_the_completion(registry, hf, tmp_path):
    session = setup(registry, hf, tmp_path, hf.prompt_completion)
    tok = session.backend.tokenizer
    row = json.loads(hf.prompt_completion.read_text().splitlines()[0])
    prompt_ids = tok(row["prompt"])["input_ids"]
    full = tok(row["prompt"] + row["completion"] + "<|im_end|>")["input_ids"]
    ids, labels = prepared(session, 0)
    assert session.backend.shape == "prompt_completion" and session.backend.mask == "completion_only"
    assert ids == full
    assert labels == [-100] * len(prompt_ids) + full[len(prompt_ids):]
    assert trained_chars(tok, ids, labels) == row["completion"] + "<|im_end|>"


def test_mask_none_on_messages_trains_everything(registry, hf, tmp_path):
    session = setup(registry, hf, tmp_path, hf.messages, "data.mask='none'")
    ids, labels = prepared(session, 0)
    assert labels == ids


def test_a_mask_that_trains_on_everything_is_an_error(registry, hf, tmp_path):
    # a template whose {% generation %} covers every turn: masking asked for, nothing masked
    everything = "{%- for m in messages -%}{%- generation -%}{{- m['content'] + '<|im_end|>' -}}{%- endgeneration -%}{%- endfor -%}"
    with pytest.raises(ConfigError, match="trains on every token of the first batch"):
        setup(registry, hf, tmp_path, hf.messages, f'model.chat_template="{everything}"')


def test_a_mask_that_trains_on_nothing_is_an_error(registry, hf, tmp_path):
    from trainctl.backends.hf.sft import mask_check

    nothing = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]
    assert "trains on no token" in mask_check(nothing, "assistant_only")[1]
    assert mask_check([{"input_ids": [1, 2], "labels": [1, 2]}], "none") == (1.0, "")
    # end to end: assistant_only with a template whose markers wrap nothing of the assistant's
    empty = ("{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' -}}"
             "{%- generation -%}{%- endgeneration -%}{%- endfor -%}")
    with pytest.raises(ConfigError, match="no assistant tokens"):
        setup(registry, hf, tmp_path, hf.messages, f'model.chat_template="{empty}"')


def test_completion_only_on_text_rows_is_a_config_error(registry, hf, tmp_path):
    with pytest.raises(ConfigError, match="completion_only needs prompt/completion rows"):
        setup(registry, hf, tmp_path, hf.text, "data.mask='completion_only'")


def test_validation_report_stops_before_the_model_loads(registry, hf, tmp_path, capsys, monkeypatch):
    from trainctl.backends.hf import loading

    monkeypatch.setattr(loading, "model", lambda *a, **k: pytest.fail("the model loaded despite bad data"))
    good = {"messages": [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "<think>hm</think>Aye."}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": "hello"}),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "no thinking"}]}),
        json.dumps({"messages": [{"role": "user", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "<think>.</think>ok"}]}),
        json.dumps(good),
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"data check failed: \d+ problem\(s\), first in .*bad.jsonl"):
        setup(registry, hf, tmp_path, data, "data.require_reasoning=true", "data.max_row_tokens=200")
    report = capsys.readouterr().err
    assert "data check: " in report and "8 rows (messages)" in report
    assert "error   not a JSON object: 1 row(s): line 2 (invalid JSON" in report
    assert "error   wrong schema: 1 row(s): line 3 ('messages' must be a non-empty list" in report
    assert "error   roles out of order: 2 row(s): line 4 (user after user), line 6 (ends with user, expected assistant)" in report
    assert "error   no reasoning block <think>...</think>: 1 row(s): line 5 (turn 1)" in report
    assert "error   longer than data.max_row_tokens 200: 1 row(s): line 7 (" in report


def test_unclosed_assistant_turns_and_long_rows(registry, hf, tmp_path, capsys):
    # a template that forgets the end-of-turn token after assistant turns: the model never learns to stop
    unclosed = ("{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' -}}"
                "{%- if m['role'] == 'assistant' -%}{%- generation -%}{{- m['content'] -}}{%- endgeneration -%}"
                "{%- else -%}{{- m['content'] + '<|im_end|>' -}}{%- endif -%}{%- endfor -%}")
    with pytest.raises(ConfigError, match="assistant turn not closed by the end-of-turn token"):
        setup(registry, hf, tmp_path, hf.messages, f'model.chat_template="{unclosed}"')
    # over model.max_length is a warning: listed, in the plan, and training goes on (truncated)
    session = setup(registry, hf, tmp_path, hf.messages, "model.max_length=64")
    err = capsys.readouterr().err
    assert "warning longer than model.max_length 64 (truncated):" in err
    assert "longer than model.max_length 64" in session.plan.details["data warnings"]
    assert max(len(r) for r in session.backend.sft.train["input_ids"]) == 64


def test_split_is_fixed_by_split_seed_alone(tmp_path):
    from trainctl.backends.hf import rows

    data = hf_assets.write_jsonl(tmp_path / "t.jsonl", hf_assets.text_rows(40))
    read = rows.read(str(data), "data.train")
    a_train, a_val = rows.split(read, 0.1, seed=0)
    b_train, b_val = rows.split(rows.read(str(data), "data.train"), 0.1, seed=0)
    assert a_val.lines == b_val.lines and len(a_val.rows) == 4 and len(a_train.rows) == 36
    assert not set(a_val.lines) & set(a_train.lines)
    assert rows.split(read, 0.1, seed=1)[1].lines != a_val.lines


def test_parquet_and_saved_datasets_read_like_jsonl(tmp_path):
    import datasets

    from trainctl.backends.hf import rows

    source = hf_assets.prompt_completion_rows(10)
    datasets.Dataset.from_list(source).to_parquet(str(tmp_path / "pc.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(source)}).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "pc.parquet", tmp_path / "saved"):
        read = rows.read(str(path), "data.train")
        assert read.rows == source and rows.detect_shape(read, "auto", "text") == "prompt_completion"
    with pytest.raises(ConfigError, match="does not exist"):
        rows.read(str(tmp_path / "missing.jsonl"), "data.train")


def test_qwen3_template_without_markers_gets_trls_training_template(registry, hf, tmp_path):
    import trl

    qwen3 = f"{trl.__path__[0]}/chat_templates/qwen3.jinja"  # Qwen3's own template: no {% generation %}
    rows = [{"messages": [{"role": "user", "content": f"Who speaks? {i}"},
                          {"role": "assistant", "content": f"<think>\nA citizen, {i}.\n</think>\n\nFirst Citizen."}]}
            for i in range(12)]
    data = hf_assets.write_jsonl(tmp_path / "think.jsonl", rows)
    session = setup(registry, hf, tmp_path, data, f"model.chat_template='{qwen3}'", "data.require_reasoning=true")
    tok = session.backend.tokenizer
    ids, labels = prepared(session, 0)
    trained = trained_chars(tok, ids, labels)
    assert trained == "<think>\nA citizen, 0.\n</think>\n\nFirst Citizen.<|im_end|>\n"  # TRL's Qwen3 span
    assert "Who speaks" not in trained and "Who speaks" in tok.decode(ids)
    session.close()  # frees the run directory's lock for the next run in it
    rows[5]["messages"][1]["content"] = "First Citizen."  # no reasoning block
    hf_assets.write_jsonl(data, rows)
    with pytest.raises(ConfigError, match="no reasoning block <think>...</think> at line 6"):
        setup(registry, hf, tmp_path, data, f"model.chat_template='{qwen3}'", "data.require_reasoning=true")


def test_hf_lora_sub_table_validates_and_round_trips(registry, tmp_path):
    import tomllib

    from trainctl.kernel.config import dump_toml, resolve

    config = make_config(registry, tmp_path, "hf.lora.r=4", 'hf.lora.target_modules=["q_proj"]', backend="hf")
    assert config.sections["hf"].lora.r == 4 and config.sections["hf"].lora.target_modules == ("q_proj",)
    again = resolve(tomllib.loads(dump_toml(config.to_dict())), registry)
    assert again.sections == config.sections and again.data == config.data
    with pytest.raises(ConfigError, match=r"unknown key 'hf.lora.rr' \(did you mean 'r'\?\)"):
        make_config(registry, tmp_path, "hf.lora.rr=4", backend="hf")
    with pytest.raises(ConfigError, match="lm_head cannot take an adapter"):
        make_config(registry, tmp_path, 'hf.lora.target_modules=["lm_head"]', backend="hf")
    with pytest.raises(ConfigError, match='packing must be false, "bfd" or "wrapped"'):
        make_config(registry, tmp_path, "data.packing=true", backend="hf")


class _Orders:
    """The two calls :class:`epochs.Layout` makes of SFTData, with a known order per epoch."""

    def order(self, split, epoch, shuffle):
        import numpy as np

        return np.arange(10)[::-1] if epoch % 2 else np.arange(10)

    def indices(self, split, first, count, shuffle):
        return [int(self.order(split, i // 10, shuffle)[i % 10]) for i in range(first, first + count)]


def test_epoch_layouts_continue_or_take_trls_short_step():
    from trainctl.backends.hf.epochs import Layout

    sft = _Orders()
    carry = Layout(n_rows=10, batch_size=4, grad_accum=2, short_step=False, shuffle=True)
    assert carry.step(sft, 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert carry.step(sft, 1) == [[8, 9, 9, 8], [7, 6, 5, 4]]  # runs on into epoch 1's order
    assert carry.steps(1) == 2 and carry.steps(2.0) == 3 and carry.epochs(4) == pytest.approx(3.2)  # ceil(20 / 8)
    short = Layout(n_rows=10, batch_size=4, grad_accum=2, short_step=True, shuffle=True)
    assert short.steps_per_epoch == 2 and short.steps(3) == 6 and short.epochs(6) == 3
    assert short.step(sft, 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert short.step(sft, 1) == [[8, 9]]  # the epoch's last step: what is left, one short micro-batch
    assert short.step(sft, 2) == [[9, 8, 7, 6], [5, 4, 3, 2]] and short.step(sft, 3) == [[1, 0]]
