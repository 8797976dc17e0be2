"""Data loading, tokenization with loss masks, data order, padding and packing.

Real files in tmp_path and the default model's real tokenizer (SmolLM2, ChatML template);
packing is checked through a tiny real model: a packed batch must give the same loss
and logits as its examples run one by one."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from thrifty.errors import ThriftyError
from thrifty.formats.build import build_model
from thrifty.formats.gguf_reader import open_gguf
from thrifty.formats.gguf_tokenizer import tokenizer_from_gguf
from thrifty.formats.hf import load_hf_config, load_hf_state_dict
from thrifty.model.tokenizer import Tokenizer
from thrifty.sft.batches import collate_padded, pack_examples
from thrifty.sft.examples import TokenizedExample, tokenize_dataset, tokenize_example
from thrifty.training.losses import chunked_cross_entropy
from thrifty.training.rows import DataOrder, load_rows

from tiny_models import save_hf_model

PC_ROWS = [{"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "Capital of France?", "completion": "Paris."}]
ALPACA_ROW = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": "84"},
]


@pytest.fixture(scope="session")
def tokenizer(default_gguf_path: Path) -> Tokenizer:
    return tokenizer_from_gguf(open_gguf(default_gguf_path), default_gguf_path)


def _write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _labelled_runs(example: TokenizedExample, tokenizer: Tokenizer) -> list[str]:
    """The decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


# ---------------------------------------------------------------- loading files


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_every_file_type_loads(tmp_path: Path, suffix: str, tokenizer: Tokenizer) -> None:
    rows = load_rows(_write(tmp_path / f"train{suffix}", PC_ROWS))
    assert rows == PC_ROWS
    assert rows.locations[1].startswith(str(tmp_path / f"train{suffix}"))
    examples = tokenize_dataset(rows, tokenizer, max_length=128)
    assert [_labelled_runs(e, tokenizer) for e in examples] == [["4<|im_end|>"], ["Paris.<|im_end|>"]]


def test_json_with_data_key_jsonl_named_json_and_in_memory(tmp_path: Path) -> None:
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": PC_ROWS}), encoding="utf-8")
    assert load_rows(wrapped) == PC_ROWS
    assert load_rows(_write(tmp_path / "lines.jsonl", PC_ROWS).rename(tmp_path / "lines.json")) == PC_ROWS
    assert load_rows(PC_ROWS) == PC_ROWS and load_rows(str(wrapped)) == PC_ROWS


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(ThriftyError, match=r"bad\.jsonl: line 3: malformed JSON"):
        load_rows(path)
    path.write_text('{"text": "a"}\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(ThriftyError, match=r"bad\.jsonl: line 2: expected a JSON object.*got a list"):
        load_rows(path)


def test_malformed_json_and_csv_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n', encoding="utf-8")
    with pytest.raises(ThriftyError, match=r"bad\.json: line 3 column"):
        load_rows(path)
    path.write_text('[{"text": "a"}, 3]', encoding="utf-8")
    with pytest.raises(ThriftyError, match=r"bad\.json: row 2: expected a JSON object, got a number"):
        load_rows(path)
    path = tmp_path / "bad.csv"
    path.write_text('prompt,completion\n"a","b"\nx,y,z\n', encoding="utf-8")
    with pytest.raises(ThriftyError, match=r"bad\.csv row 2 \(line 3\): 3 fields, but the header has 2"):
        load_rows(path)


@pytest.mark.parametrize("name,content", [("empty.jsonl", "\n\n"), ("empty.json", "[]"), ("empty.csv", "text\n"),
                                          ("blank.csv", "")])
def test_empty_files_are_errors(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ThriftyError, match=rf"{name}: the file holds no examples"):
        load_rows(tmp_path / name)


def test_unsupported_extension_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ThriftyError, match=r"data\.txt: unsupported file type '\.txt'; use \.jsonl"):
        load_rows(tmp_path / "data.txt")
    with pytest.raises(ThriftyError, match="data file not found"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(ThriftyError, match="empty"):
        load_rows([])


# ---------------------------------------------------------------- formats and errors


def test_missing_field_names_row_and_field(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = _write(tmp_path / "train.jsonl", [PC_ROWS[0], {"prompt": "no answer"}])
    with pytest.raises(ThriftyError, match=r"train\.jsonl line 2: missing field 'completion'"):
        tokenize_dataset(load_rows(path), tokenizer, max_length=128)
    with pytest.raises(ThriftyError, match=r"rows\[1\]: missing field 'output'"):
        tokenize_dataset([ALPACA_ROW, {"instruction": "x"}], tokenizer, max_length=128, format="alpaca")
    with pytest.raises(ThriftyError, match=r"rows\[0\]: messages\[1\] has no 'role'"):
        tokenize_dataset([{"messages": [CHAT[1], {"content": "x"}]}], tokenizer, max_length=128)
    with pytest.raises(ThriftyError, match=r"rows\[0\]: cannot tell the data format from the columns \['question'\]"):
        tokenize_dataset([{"question": "?"}], tokenizer, max_length=128)


def test_rows_with_empty_answers_are_skipped_by_line_and_refused_when_all_are(tmp_path: Path,
                                                                             tokenizer: Tokenizer) -> None:
    """A blank completion (or output, assistant turn, text) would train only the end-of-turn
    token: such rows are skipped with their count and lines, an error if none is left."""
    rows = [PC_ROWS[0], {"prompt": "a", "completion": ""}, PC_ROWS[1], {"prompt": "b", "completion": " \n"}]
    path = _write(tmp_path / "train.jsonl", rows)
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 rows have an empty completion.*"
                                         r"train\.jsonl line 2, .*train\.jsonl line 4\."):
        examples = tokenize_dataset(load_rows(path), tokenizer, max_length=128)
    assert [_labelled_runs(e, tokenizer) for e in examples] == [["4<|im_end|>"], ["Paris.<|im_end|>"]]
    chat = [{"messages": [CHAT[1], {"role": "assistant", "content": ""}]}]
    with pytest.raises(ThriftyError, match=r"1 of 1 rows have an empty assistant turn: nothing to train on "
                                           r"\(rows\[0\]\)"):
        tokenize_dataset(chat, tokenizer, max_length=128)
    with pytest.raises(ThriftyError, match=r"2 of 2 rows have an empty output"):
        tokenize_dataset([{"instruction": "x", "output": ""}] * 2, tokenizer, max_length=128, format="alpaca")


def test_too_long_sample_errors_truncates_or_drops(tokenizer: Tokenizer) -> None:
    rows = [{"text": "short"}, {"text": " ".join(["word"] * 50)}]
    with pytest.raises(ThriftyError, match=r"rows\[1\]: the example is 51 tokens long, more than max_length=20\. "
                                           r"Raise max_length.*truncation='truncate'"):
        tokenize_dataset(rows, tokenizer, max_length=20)
    truncated = tokenize_dataset(rows, tokenizer, max_length=20, truncation="truncate")
    assert [len(e) for e in truncated] == [2, 20]
    with pytest.warns(UserWarning, match="skipped 1 of 2 examples"):
        assert len(tokenize_dataset(rows, tokenizer, max_length=20, truncation="drop")) == 1
    # A row too big to tokenize at all (told from its length): dropped, or cut when truncating.
    huge = [rows[0], {"text": "word " * 200_000}]
    with pytest.warns(UserWarning, match="skipped 1 of 2 examples"):
        assert len(tokenize_dataset(huge, tokenizer, max_length=20, truncation="drop")) == 1
    assert [len(e) for e in tokenize_dataset(huge, tokenizer, max_length=20, truncation="truncate")] == [2, 20]


def test_text_gets_eos_and_loss_everywhere(tokenizer: Tokenizer) -> None:
    example = tokenize_example({"text": "Hello world"}, tokenizer, max_length=32)
    assert example.input_ids == tokenizer.encode("Hello world") + [tokenizer.eos_token_id]
    assert example.labels == example.input_ids


def test_prompt_completion_loss_only_on_the_answer(tokenizer: Tokenizer) -> None:
    example = tokenize_example(PC_ROWS[1], tokenizer, max_length=128)
    assert _labelled_runs(example, tokenizer) == ["Paris.<|im_end|>"]
    messages = [{"role": "user", "content": PC_ROWS[1]["prompt"]}, {"role": "assistant", "content": "Paris."}]
    assert tokenizer.decode(example.input_ids, skip_special_tokens=False) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    # The unlabelled head is exactly the generation prompt the model sees at inference.
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True))
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(example.labels[: len(prompt_ids)]) == {-100}
    everything = tokenize_example(PC_ROWS[1], tokenizer, max_length=128, completion_only_loss=False)
    assert everything.labels == everything.input_ids == example.input_ids


def test_alpaca_renders_instruction_and_input_as_the_user_turn(tokenizer: Tokenizer) -> None:
    example = tokenize_example(ALPACA_ROW, tokenizer, max_length=128)
    assert _labelled_runs(example, tokenizer) == ["5<|im_end|>"]
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in tokenizer.decode(
        example.input_ids, skip_special_tokens=False)
    no_input = tokenize_example({**ALPACA_ROW, "input": ""}, tokenizer, max_length=128)
    assert "<|im_start|>user\nAdd the numbers.<|im_end|>" in tokenizer.decode(no_input.input_ids,
                                                                             skip_special_tokens=False)


def test_input_output_rows_and_a_text_column(tokenizer: Tokenizer) -> None:
    """Unsloth-style input/output rows: the input is the user turn. A `text` column made
    from other columns wins over them, as TRL reads it."""
    example = tokenize_example({"input": "Add 2 and 3.", "output": "5"}, tokenizer, max_length=128)
    assert _labelled_runs(example, tokenizer) == ["5<|im_end|>"]
    assert "<|im_start|>user\nAdd 2 and 3.<|im_end|>" in tokenizer.decode(example.input_ids,
                                                                         skip_special_tokens=False)
    text = tokenize_example({**ALPACA_ROW, "text": "plain text"}, tokenizer, max_length=128)
    assert tokenizer.decode(text.input_ids, skip_special_tokens=True).strip() == "plain text"


def test_multi_turn_chat_loss_on_every_assistant_turn(tmp_path: Path, tokenizer: Tokenizer) -> None:
    # Through a CSV too, where the messages column is a JSON string.
    path = _write(tmp_path / "chat.csv", [{"messages": json.dumps(CHAT)}])
    example = tokenize_dataset(load_rows(path), tokenizer, max_length=256)[0]
    assert _labelled_runs(example, tokenizer) == ["Hello! How can I help?<|im_end|>", "84<|im_end|>"]
    assert tokenizer.decode(example.input_ids, skip_special_tokens=False) == \
        tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)


def test_conversational_prompt_completion(tokenizer: Tokenizer) -> None:
    row = {"prompt": CHAT[:4], "completion": [CHAT[4]]}
    example = tokenize_example(row, tokenizer, max_length=256)
    assert _labelled_runs(example, tokenizer) == ["84<|im_end|>"]  # earlier assistant turns are prompt


def test_template_that_rewrites_earlier_turns(tokenizer: Tokenizer) -> None:
    """A Qwen3-style template renders an empty think block only on the last assistant
    turn, so earlier turns are not a prefix of the whole; their content is located instead."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
                "{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    qwen_like = dataclasses.replace(tokenizer, chat_template=template)
    example = tokenize_example({"messages": CHAT[1:]}, qwen_like, max_length=256)
    assert _labelled_runs(example, tokenizer) == ["Hello! How can I help?<|im_end|>",
                                                  "<think>\n\n</think>\n\n84<|im_end|>"]


def test_base_model_without_template_concatenates(tokenizer: Tokenizer) -> None:
    base = dataclasses.replace(tokenizer, chat_template=None)
    example = tokenize_example({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, base, max_length=64)
    assert tokenizer.decode(example.input_ids, skip_special_tokens=False) == "Q: 2+2?\nA: 4<|im_end|>"
    assert _labelled_runs(example, tokenizer) == [" 4<|im_end|>"]


# ---------------------------------------------------------------- data order


def test_data_order_is_reproducible_and_covers_each_epoch() -> None:
    a, b = DataOrder(10, batch_size=3, seed=7), DataOrder(10, batch_size=3, seed=7)
    epoch0 = list(a)
    assert epoch0 == list(b) and [len(x) for x in epoch0] == [3, 3, 3, 1]
    assert sorted(i for batch in epoch0 for i in batch) == list(range(10))
    epoch1 = list(a)
    assert a.epoch == 1 and sorted(i for batch in epoch1 for i in batch) == list(range(10))
    assert epoch1 != epoch0  # reshuffled
    assert list(DataOrder(10, batch_size=3, seed=8)) != epoch0
    dropped = DataOrder(10, batch_size=3, seed=7, drop_last=True)
    assert list(dropped) == epoch0[:3] and len(dropped) == 3


def test_data_order_resumes_mid_epoch() -> None:
    straight = DataOrder(7, batch_size=2, seed=3)
    expected = [straight.next_batch() for _ in range(12)]  # crosses three epoch boundaries
    for stop in (1, 4, 5, 9):
        first = DataOrder(7, batch_size=2, seed=3)
        seen = [first.next_batch() for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = DataOrder(7, batch_size=2, seed=3)
        resumed.load_state_dict(state)
        seen += [resumed.next_batch() for _ in range(12 - stop)]
        assert seen == expected
    # Iterating per epoch resumes too: the rest of the interrupted epoch, then the next ones.
    first = DataOrder(7, batch_size=2, seed=3)
    it = iter(first)
    seen = [next(it), next(it)]
    resumed = DataOrder(7, batch_size=2, seed=3)
    resumed.load_state_dict(first.state_dict())
    seen += list(resumed) + list(resumed)
    assert seen == expected[:8]
    with pytest.raises(ThriftyError, match="num_items=7, but this run has 8"):
        DataOrder(8, batch_size=2, seed=3).load_state_dict(state)


# ---------------------------------------------------------------- batches through a tiny model


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma3"])  # mistral, gemma3's local layers: window of 5
def tiny_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, directory)
    model = build_model(load_hf_config(directory), load_hf_state_dict(directory), source=str(directory))
    return model.float().eval()


def _examples(vocab: int) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in [(5, 2), (9, 4), (3, 0), (12, 6), (7, 3), (2, 1), (11, 5), (8, 8)]:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append(TokenizedExample(ids, [-100] * prompt + ids[prompt:]))
    return examples


def _reference(model, examples):
    """Each example alone, unmasked (the model's own causal/sliding mask), full logits."""
    total, count, logits = 0.0, 0, []
    for e in examples:
        out = model(torch.tensor([e.input_ids]))[0]
        targets = torch.tensor(e.labels[1:] + [-100])
        total += F.cross_entropy(out, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
        logits.append(out)
    return total / count, logits


def test_packing_matches_examples_one_by_one(tiny_model) -> None:
    examples = _examples(tiny_model.config.vocab_size)
    packs = pack_examples(examples, max_length=16, sliding_window=tiny_model.config.sliding_window)
    assert [p.lengths for p in packs] == [[5, 9], [3, 12], [7, 2], [11], [8]]  # next-fit, order kept
    assert packs[0].positions.tolist() == [list(range(5)) + list(range(9))]
    assert packs[0].labels[0, 4] == -100  # example 1's last token does not predict example 2's first
    reference_loss, reference_logits = _reference(tiny_model, examples)
    total, count, logits = 0.0, 0, []
    with torch.no_grad():
        for pack in packs:
            hidden = tiny_model.hidden_states(pack.input_ids, pack.positions, pack.mask)
            loss_sum, n = chunked_cross_entropy(hidden, tiny_model.lm_head.weight, pack.labels, chunk_size=7)
            total, count = total + loss_sum, count + n
            logits += list(tiny_model.lm_head(hidden[0]).split(pack.lengths))
    torch.testing.assert_close(total / count, reference_loss, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(logits, reference_logits):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_padded_batch_matches_examples_one_by_one(tiny_model) -> None:
    examples = _examples(tiny_model.config.vocab_size)
    batch = collate_padded(examples, pad_token_id=0, sliding_window=tiny_model.config.sliding_window)
    assert batch["input_ids"].shape == (8, 12) and batch["mask"].shape == (8, 1, 12, 12)
    assert batch["labels"][2, 2:].tolist() == [-100] * 10  # last real position and padding
    reference_loss, _ = _reference(tiny_model, examples)
    with torch.no_grad():
        hidden = tiny_model.hidden_states(batch["input_ids"], batch["positions"], batch["mask"])
        loss_sum, n = chunked_cross_entropy(hidden, tiny_model.lm_head.weight, batch["labels"])
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(loss_sum / n, reference_loss, atol=1e-5, rtol=1e-5)


def test_packing_rejects_examples_longer_than_the_pack() -> None:
    with pytest.raises(ThriftyError, match="example 1 has 9 tokens, more than the packing length 8"):
        pack_examples([TokenizedExample([1] * 3, [1] * 3), TokenizedExample([1] * 9, [1] * 9)], max_length=8)
