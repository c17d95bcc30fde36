"""data.py: packing into sequences, each source's prompt format, local records and their errors, seeded subsets.

(The lm-eval tasks built on these sources, VisR-Bench's layouts and languages are tested in test_tasks.py.)"""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL

from kvcore_eval.calibration import data
from kvcore_eval.calibration.data import (
    SOURCES,
    chat_turns,
    format_record,
    iter_documents,
    pack_sequences,
    read_json_records,
    resolve_source,
    source_pairs,
    split_indices,
)

TEXTS = [f"text number {i}: " + "abc " * (i % 7) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EXAMPLE_MODEL)


def stream(tokenizer, texts) -> list[int]:
    """Every text's tokens followed by EOS: what packing cuts into sequences."""
    return [
        t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]


def test_packing_loses_no_token_and_cuts_at_seq_len(tokenizer):
    expected = stream(tokenizer, TEXTS)
    sequences = list(pack_sequences(TEXTS, tokenizer, seq_len=32, max_tokens=10**9))
    assert [t for s in sequences for t in s] == expected, "the stream, in order, nothing dropped or padded"
    assert all(len(s) == 32 for s in sequences[:-1]) and 0 < len(sequences[-1]) <= 32
    assert expected.count(tokenizer.eos_token_id) == len(TEXTS)


@pytest.mark.parametrize("max_tokens", [1, 31, 32, 33, 100, 320])
def test_packing_stops_at_max_tokens_and_is_prefix_stable(tokenizer, max_tokens):
    expected = stream(tokenizer, TEXTS)
    sequences = list(pack_sequences(TEXTS, tokenizer, seq_len=32, max_tokens=max_tokens))
    assert [t for s in sequences for t in s] == expected[:max_tokens]
    larger = list(pack_sequences(TEXTS, tokenizer, seq_len=32, max_tokens=max_tokens + 57))
    full = [s for s in sequences if len(s) == 32]
    assert larger[: len(full)] == full, "a larger budget extends the run, never changes its full sequences"


def test_packing_reads_a_text_only_while_short_of_max_tokens(tokenizer):
    read = []

    def texts():
        for text in TEXTS:
            read.append(text)
            yield text

    needed = len(stream(tokenizer, TEXTS[:3]))
    sequences = list(pack_sequences(texts(), tokenizer, seq_len=8, max_tokens=needed))
    assert len(read) == 3 and sum(map(len, sequences)) == needed


def test_alpaca_format_with_and_without_input():
    header = data._ALPACA_HEADER
    prompt, response = format_record({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca")
    assert prompt == f"{header}### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n" and response == "5"
    prompt, _ = format_record({"instruction": "Add.", "input": "", "output": "5"}, "alpaca")
    assert prompt == f"{header}### Instruction:\nAdd.\n\n### Response:\n"
    prompt, _ = format_record({"instruction": "Add.", "output": "5"}, "alpaca")  # medalpaca-style: no input field
    assert "### Input" not in prompt


def test_functioncall_formats_drop_end_of_text_markers():
    record = json.loads((EXAMPLE_DATA / "functioncall.jsonl").read_text().splitlines()[0])
    prompt, response = format_record(record, "functioncall")
    assert prompt == record["system"].strip() + "\n\n"
    assert "<|endoftext|>" not in response and response.startswith("USER: What is the weather in Paris?")
    assert response.endswith("It is 18 degrees and cloudy in Paris.")
    turns = chat_turns(record["chat"])
    assert [role for role, _ in turns] == ["USER", "ASSISTANT", "FUNCTION RESPONSE", "ASSISTANT"]
    assert all("<|endoftext|>" not in text for _, text in turns)
    prompt, reply = format_record(record, "functioncall_turn")
    assert prompt.endswith("USER: What is the weather in Paris?\n\n\nASSISTANT:") and reply == f" {turns[1][1]}"


def test_question_and_field_formats_and_unknown_ones():
    assert format_record({"question": "Why?", "answer": "x"}, "question") == ("", "Why?")
    assert format_record({"body": "plain text", "n": 3}, "field:body") == ("", "plain text")
    assert format_record({"body": None}, "field:body") == ("", "")
    with pytest.raises(KeyError, match=r"my.jsonl: record has no field 'text' \(fields: body\)"):
        format_record({"body": "x"}, "field:text", "my.jsonl")
    with pytest.raises(ValueError, match="unknown prompt format 'chatml'"):
        format_record({"body": "x"}, "chatml")


@pytest.mark.parametrize("name", [n for n in SOURCES if n != "visr"])
def test_each_shipped_source_reads_in_its_prompt_format(name):
    source = resolve_source(name)
    records = list(read_json_records(EXAMPLE_DATA / f"{name}.jsonl"))
    pairs = list(source_pairs(source, data_dir=str(EXAMPLE_DATA)))
    assert len(pairs) == len(records) > 0
    assert pairs == [format_record(r, source.prompt_format) for r in records]
    if source.prompt_format == "alpaca":
        assert pairs[0][0].endswith("### Response:\n") and pairs[0][1] == records[0]["output"]
    assert list(iter_documents(f"kvcore:{name}", data_dir=str(EXAMPLE_DATA))) == pairs


def test_unknown_sources_and_languages_are_named():
    with pytest.raises(ValueError, match="unknown data source 'alpacca'; known: alpaca, codealpaca"):
        resolve_source("alpacca")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        next(source_pairs(resolve_source("visr"), "xx", str(EXAMPLE_DATA)))


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"a": 1}\n\n{"a": 2\n', r"bad.jsonl, line 3: not valid JSON \(.*column"),
        ('{"a": 1}\n[1, 2]\n', "bad.jsonl, line 2: a JSON list, not an object"),
        ('{"a": 1}\n"text"\n', "bad.jsonl, line 2: a JSON str, not an object"),
    ],
)
def test_jsonl_errors_name_the_line(content, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    records = read_json_records(path)
    assert next(records) == {"a": 1}, "records before the bad line are read"
    with pytest.raises(ValueError, match=message):
        list(records)


def test_json_files_and_encodings(tmp_path):
    good = tmp_path / "list.json"
    good.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert list(read_json_records(good)) == [{"a": 1}, {"a": 2}]
    (tmp_path / "object.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="is not a JSON list of objects"):
        list(read_json_records(tmp_path / "object.json"))
    (tmp_path / "broken.json").write_text('[{"a": 1},\n{"a": }]')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON \(.*line 2\)"):
        list(read_json_records(tmp_path / "broken.json"))
    (tmp_path / "latin.jsonl").write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="is not UTF-8 text \\(byte 0xe9.*iconv"):
        list(read_json_records(tmp_path / "latin.jsonl"))


def test_a_lone_surrogate_names_the_file_and_line(tmp_path):
    """`"\\ud800"` decodes to no character: it used to fail in a codec far from its file; the record is named here.
    A proper pair (an emoji written as two escapes) is text and reads."""
    path = tmp_path / "alpaca.jsonl"
    path.write_text('{"instruction": "a", "output": "\\ud83d\\ude00"}\n{"instruction": "b", "output": "x \\ud800 y"}\n')
    records = read_json_records(path)
    assert next(records)["output"] == "\U0001f600"
    with pytest.raises(ValueError, match=r"alpaca.jsonl, line 2: holds a lone surrogate \(\\ud800, .*fix or remove"):
        next(records)
    listed = tmp_path / "list.json"
    listed.write_text('[{"text": "ok"}, {"text": "\\udfff"}]')
    with pytest.raises(ValueError, match=r"list.json, record 2: holds a lone surrogate \(\\udfff"):
        list(read_json_records(listed))
    with pytest.raises(ValueError, match="alpaca.jsonl, line 2: holds a lone surrogate"):
        data.task_dataset("alpaca", data_dir=str(tmp_path))  # what an lm-eval task loads


def test_local_files_and_missing_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file .*none.jsonl does not exist"):
        data.load_records(str(tmp_path / "none.jsonl"))
    (tmp_path / "notes.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
    assert list(iter_documents(str(tmp_path / "notes.jsonl"))) == [("", "first"), ("", "second")]
    with pytest.raises(FileNotFoundError, match="has no medalpaca.jsonl"):
        data.source_records(resolve_source("medalpaca"), data_dir=str(tmp_path))


def test_seeded_order_is_a_permutation_whose_subsets_are_prefixes():
    order = split_indices(50, None, seed=3)
    assert sorted(order) == list(range(50))
    assert split_indices(50, 10, seed=3) == order[:10] and split_indices(50, 20, seed=3)[:10] == order[:10]
    assert split_indices(50, None, seed=3) == order and split_indices(50, None, seed=4) != order


def test_documents_are_encoded_with_the_tokenizers_own_bos_once(tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(EXAMPLE_MODEL)
    assert not data.adds_bos(plain) and data.encode_as_lm_eval(plain, "ab") == plain("ab")["input_ids"]
    spec = json.loads((EXAMPLE_MODEL / "tokenizer.json").read_text())  # the same tokenizer, adding BOS
    spec["post_processor"]["single"] = [
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        *spec["post_processor"]["single"],
    ]
    spec["post_processor"]["special_tokens"] = {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    for name in ("tokenizer_config.json",):
        (tmp_path / name).write_text((EXAMPLE_MODEL / name).read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with_bos = AutoTokenizer.from_pretrained(tmp_path)
    assert data.adds_bos(with_bos)
    assert data.encode_as_lm_eval(with_bos, "ab") == [1, *plain("ab")["input_ids"]]
    assert data.encode_as_lm_eval(with_bos, "<s>ab") == with_bos("<s>ab", add_special_tokens=False)["input_ids"], (
        "a text that starts with the BOS text gets no second one"
    )
    (sequence,) = pack_sequences(["ab", "cd"], with_bos, seq_len=16, max_tokens=100)
    assert sequence == [1, *plain("ab")["input_ids"], 2, 1, *plain("cd")["input_ids"], 2]
