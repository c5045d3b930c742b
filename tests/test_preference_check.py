"""The preference data check: each rule on a real JSONL file read by the hf row reader (so the
line numbers are the file's), with the tiny tokenizer and its chat template."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env
from trainctl.backends.hf.preference_check import check_preference_rows, require_valid_preferences
from trainctl.backends.hf.rows import read
from trainctl.kernel.errors import ConfigError

USER = {"role": "user", "content": "What colour is the sky?"}
SYSTEM = {"role": "system", "content": "Speak as in the play."}


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


GOOD = {
    "explicit strings": {"prompt": "ROMEO:\n", "chosen": "It is blue.", "rejected": "It is green."},
    "explicit messages": {"prompt": [USER], "chosen": answer("Blue."), "rejected": answer("Green.")},
    "implicit messages": {"chosen": [SYSTEM, USER, *answer("Blue.")], "rejected": [SYSTEM, USER, *answer("Green.")]},
}


@pytest.fixture(scope="module")
def tokenizer(hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf.tokenizer)


def check(tmp_path, tokenizer, lines: list, *, max_length: int = 128) -> list[str]:
    """Write ``lines`` (dicts as JSON, strings as they are) to a file and check it."""
    path = tmp_path / "pref.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return check_preference_rows(read(str(path), "data.train"), source="data.train", tokenizer=tokenizer,
                                 max_length=max_length)


@pytest.mark.parametrize("form", sorted(GOOD))
def test_good_rows_in_every_form_pass(tmp_path, tokenizer, form):
    assert check(tmp_path, tokenizer, [GOOD[form]] * 3) == []


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "p", "rejected": "no"}, "line 2: 'chosen' is missing; a preference row needs both 'chosen' and 'rejected'"),
    ({"prompt": "p", "chosen": "yes", "rejected": None}, "line 2: 'rejected' is missing"),
    ({"prompt": "p", "chosen": "  ", "rejected": "no"}, "line 2: 'chosen' is empty; a preference pair needs two non-empty answers"),
])
def test_missing_or_empty_answers_in_strings(tmp_path, tokenizer, row, expected):
    [problem] = check(tmp_path, tokenizer, [GOOD["explicit strings"], row])
    assert problem.startswith("data.train " + expected)


@pytest.mark.parametrize("row", [
    {"prompt": [USER], "chosen": answer("Blue."), "rejected": []},
    {"prompt": [USER], "chosen": answer("Blue."), "rejected": answer("   ")},
])
def test_empty_answers_in_messages(tmp_path, tokenizer, row):
    assert check(tmp_path, tokenizer, [GOOD["explicit messages"], row]) == [
        "data.train line 2: 'rejected' is empty; a preference pair needs two non-empty answers"]


@pytest.mark.parametrize("row", [
    {"prompt": "ROMEO:\n", "chosen": "It is blue.", "rejected": "It is blue."},
    {"prompt": [USER], "chosen": answer("Blue."), "rejected": answer("Blue.")},
    {"chosen": [USER, *answer("Blue.")], "rejected": [USER, *answer("Blue.")]},
])
def test_identical_answers(tmp_path, tokenizer, row):
    first = GOOD["explicit strings"] if isinstance(row["chosen"], str) else GOOD["explicit messages"]
    assert check(tmp_path, tokenizer, [first, first, row]) == [
        "data.train line 3: chosen and rejected are identical; a preference pair needs two different answers"]


def test_prompt_longer_than_the_limits_counted_with_the_template(tmp_path, tokenizer):
    long = "To be, or not to be, that is the question: " * 12
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": long}], tokenize=False, add_generation_prompt=True)
    templated = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    plain = len(tokenizer(long)["input_ids"])
    assert templated > plain  # the template's own tokens count
    rows = [{"prompt": [{"role": "user", "content": long}], "chosen": answer("Aye."), "rejected": answer("Nay.")}]
    # the template's tokens alone push it over: a limit between the plain and the templated count
    [problem] = check(tmp_path, tokenizer, rows, max_length=templated)
    assert problem == (f"data.train line 1: the prompt is {templated} tokens, which fills model.max_length {templated} "
                       "and leaves no room for the answers; shorten the prompt, raise model.max_length, or set "
                       'hf.dpo.too_long = "drop" to leave such pairs out as TRL does')
    assert check(tmp_path, tokenizer, rows, max_length=templated + 1) == []
    strings = [{"prompt": long, "chosen": "Aye.", "rejected": "Nay."}]
    assert check(tmp_path, tokenizer, strings, max_length=plain + 1) == []
    assert "fills model.max_length" in check(tmp_path, tokenizer, strings, max_length=plain)[0]


def test_a_prompt_over_the_tokenizers_own_limit_is_one_line_only(tmp_path, hf):
    """transformers warns (on stderr, once per process) about sequences over the tokenizer's
    model_max_length, 512 here; the check silences it, so its error stays the only line. In a
    fresh process: under pytest the warning's handler writes to a stream captured elsewhere."""
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "To be, or not to be. " * 200, "chosen": "Aye.", "rejected": "Nay."}) + "\n")
    code = ("import sys; from transformers import AutoTokenizer\n"
            "from trainctl.backends.hf.preference_check import check_preference_rows\n"
            "from trainctl.backends.hf.rows import read\n"
            f"tok = AutoTokenizer.from_pretrained({str(hf.tokenizer)!r})\n"
            f"print(check_preference_rows(read({str(path)!r}, 'data.train'), source='data.train', tokenizer=tok, "
            "max_length=128))\n"
            "print(len(tok('To be, or not to be. ' * 200)['input_ids']) > 512)")  # the precondition: over 512
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    problems, over = proc.stdout.splitlines()
    assert "fills model.max_length 128" in problems and over == "True"
    assert proc.stderr == ""


def test_implicit_prompt_long_is_counted_from_the_shared_turns(tmp_path, tokenizer):
    long = {"role": "user", "content": "Now is the winter of our discontent " * 12}
    row = {"chosen": [long, *answer("Aye.")], "rejected": [long, *answer("Nay.")]}
    [problem] = check(tmp_path, tokenizer, [row], max_length=40)
    assert problem.startswith("data.train line 1: the prompt is ") and "model.max_length 40" in problem


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "p", "chosen": answer("Blue."), "rejected": "Green."},
     "wrong types: 'prompt' is a string, 'chosen' is a message list, 'rejected' is a string; give all of them as "
     "strings or all as message lists"),
    ({"prompt": [USER], "chosen": "Blue.", "rejected": "Green."}, "wrong types: 'prompt' is a message list"),
    ({"prompt": "p", "chosen": 3, "rejected": "Green."},
     "'chosen' is a int; give a string or a list of {role, content} messages"),
])
def test_wrong_types_in_a_row(tmp_path, tokenizer, row, expected):
    [problem] = check(tmp_path, tokenizer, [GOOD["explicit strings"], row])
    assert problem.startswith("data.train line 2: " + expected), problem


def test_strings_and_message_lists_mixed_across_rows(tmp_path, tokenizer):
    assert check(tmp_path, tokenizer, [GOOD["explicit messages"], GOOD["explicit strings"]]) == [
        "data.train line 2: the answers are strings but the file's first row uses message lists; use one form per file"]
    assert check(tmp_path, tokenizer, [GOOD["explicit strings"], GOOD["implicit messages"]]) == [
        "data.train line 2: the answers are message lists but the file's first row uses strings; use one form per file"]


def test_implicit_prompt_conversations_that_share_no_prefix(tmp_path, tokenizer):
    other = {"role": "user", "content": "Where is the sun?"}
    row = {"chosen": [USER, *answer("Blue.")], "rejected": [other, *answer("In the sky.")]}
    assert check(tmp_path, tokenizer, [GOOD["implicit messages"], row]) == [
        "data.train line 2: chosen and rejected share no leading turn, so there is no implicit prompt; start both "
        "with the same user turn(s), or give an explicit 'prompt'"]


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": [USER, *answer("Hm.")], "chosen": answer("Blue."), "rejected": answer("Green.")},
     "the prompt ends with a assistant turn"),
    ({"prompt": [USER], "chosen": [USER], "rejected": answer("Green.")}, "'chosen' must continue the prompt with assistant turns only"),
    ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": answer("a"), "rejected": answer("b")}, "prompt[0] must be an object with a 'role'"),
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": 5}], "rejected": answer("b")}, "chosen[0].content must be a string"),
    ({"chosen": [USER, USER, *answer("a")], "rejected": [USER, USER, *answer("b")]}, "chosen[1]: roles out of order (user after user)"),
])
def test_conversation_shape(tmp_path, tokenizer, row, expected):
    [problem] = check(tmp_path, tokenizer, [row])
    assert problem.startswith("data.train line 1: " + expected), problem


def test_implicit_prompt_strings_split_on_their_shared_start(tmp_path, tokenizer):
    hh = {"chosen": "\n\nHuman: What colour is the sky?\n\nAssistant: Blue.",
          "rejected": "\n\nHuman: What colour is the sky?\n\nAssistant: Green."}
    assert check(tmp_path, tokenizer, [hh]) == []
    [problem] = check(tmp_path, tokenizer, [hh, {"chosen": "Blue.", "rejected": "Green."}])
    assert problem == ("data.train line 2: chosen and rejected share no leading text, so there is no implicit prompt; "
                       "start both with the same prompt, or give an explicit 'prompt'")
    prompt = "\n\nHuman: What colour is the sky?\n\nAssistant: "
    assert prompt == "\n\nHuman: What colour is the sky?\n\nAssistant: Blue."[:len(prompt)]
    short = len(tokenizer(prompt.rstrip(" "))["input_ids"])  # TRL leaves the space before the answers to them
    [problem] = check(tmp_path, tokenizer, [hh], max_length=short)
    assert problem.startswith(f"data.train line 1: the prompt is {short} tokens, which fills model.max_length")


def test_lines_that_are_not_objects_and_blank_lines_keep_file_numbering(tmp_path, tokenizer):
    good = json.dumps(GOOD["explicit strings"])
    problems = check(tmp_path, tokenizer, [good, "", "[1, 2]", "{not json", good,
                                           {"prompt": "p", "chosen": "x", "rejected": "x"}])
    assert [p.split(":", 1)[0] for p in problems] == ["data.train line 3", "data.train line 4", "data.train line 6"]
    assert "a row must be a JSON object, got list" in problems[0] and "invalid JSON" in problems[1]


def test_conversations_need_a_chat_template(tmp_path, hf):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(hf.plain_tokenizer)
    [problem] = check(tmp_path, plain, [GOOD["explicit messages"]])
    assert "no chat template" in problem and "model.chat_template" in problem
    assert check(tmp_path, plain, [GOOD["explicit strings"]]) == []  # strings need none


def test_empty_file(tmp_path, tokenizer):
    [problem] = check(tmp_path, tokenizer, [])
    assert problem.endswith("has no rows; give at least one preference pair")


def test_parquet_rows_are_numbered_by_row(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD["explicit strings"]] * 4 + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pref.parquet")
    problems = check_preference_rows(read(str(tmp_path / "pref.parquet"), "data.val"), source="data.val",
                                     tokenizer=tokenizer, max_length=128)
    assert problems == ["data.val line 5: chosen and rejected are identical; a preference pair needs two different answers"]


def test_require_raises_one_line_naming_the_file_and_count(tmp_path, tokenizer):
    path = tmp_path / "pref.jsonl"
    same = {"prompt": "p", "chosen": "x", "rejected": "x"}
    path.write_text("".join(json.dumps(same) + "\n" for _ in range(7)))
    with pytest.raises(ConfigError) as caught:
        require_valid_preferences(read(str(path), "data.train"), source="data.train", tokenizer=tokenizer,
                                  max_length=128, show=2)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"data check failed: 7 problem(s) in {path}: data.train line 1:")
    assert "data.train line 2:" in message and "line 3" not in message and message.endswith("(and 5 more)")
