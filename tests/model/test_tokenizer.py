"""Tokenizer parity with transformers on the default model's GGUF tokenizer, chat
templates, save/load round trips and error messages. Real files, no mocks."""

from __future__ import annotations

import json
import random
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers, processors

from thrifty.errors import ThriftyError
from thrifty.formats.gguf_reader import open_gguf
from thrifty.formats.gguf_tokenizer import tokenizer_from_gguf
from thrifty.model.tokenizer import Tokenizer

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def ours(default_gguf_path: Path) -> Tokenizer:
    return tokenizer_from_gguf(open_gguf(default_gguf_path), default_gguf_path)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf_path: Path):
    """transformers' own tokenizer rebuilt from the same GGUF (slow: ~8 s, so once)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(default_gguf_path.parent, gguf_file=default_gguf_path.name)


@pytest.fixture(scope="session")
def reference_backend(hf_gguf_tokenizer) -> BackendTokenizer:
    """transformers' GGUF tokenizer with the pre-tokenizer SmolLM2's hub tokenizer.json
    really has (and llama.cpp's "smollm" pre-type implements): every digit split off.
    transformers' GGUF converter drops that step."""
    backend = BackendTokenizer.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


def _corpus() -> list[str]:
    base = [
        "", " ", "  ", "\n", "\n\n", "\t", " \t \n ", "a", "Hello world!", "Hello, world! How are you?",
        "The quick brown fox jumps over the lazy dog.", "  leading spaces", "trailing spaces   ",
        "multiple     spaces   inside", "line1\nline2\r\nline3\rline4", "tabs\tand\ttabs\t\t",
        "What is 12*7?", "3.14159265358979", "1,000,000 dollars", "Call 555-0123 now", "2024-01-15T10:30:00Z",
        "x = 42; y = x ** 2 + 3.5e-7", "0x1F 0b1010 007", "١٢٣ ٤٥٦ (Arabic-Indic digits)", "²³ ½ ⅓ Ⅻ",
        "café naïve résumé façade", "Ünïcödé Ωμέγα Привет мир", "日本語のテキストです。", "中文测试，你好世界！",
        "한국어 텍스트", "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷", "zero\u200bwidth\u200djoiner", "e\u0301 vs é",
        "def f(x):\n    return x + 1\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "import numpy as np\nprint(np.arange(10))", "<div class=\"x\">&amp; &lt;tag&gt;</div>",
        "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}", "SELECT * FROM t WHERE id = 5;",
        "it's don't I'm we're they've she'll he'd", "IT'S DON'T I'M", "'quoted' \"double\" `back`",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>", "text<|endoftext|>more text",
        "<|im_end|><|im_end|>", " <|im_start|> spaced <|im_end|> ", "<repo_name>x<file_sep>y<filename>z",
        "<|im_start", "im_start|>", "< |im_start| >", "!!!???...,,,;;;", "a\u00a0b\u2003c", "\u3000全角スペース",
        "😀" * 5, "ab" * 40, "1" * 30, " 1 2 3 4 5 ", "-1 -2.5 +3", "$100.00 €50 ¥1000", "50% off!!!",
        "The year 1999 and 2000.", "v1.2.3-beta+build.45", "word\u0000null", "ℌ𝔢𝔩𝔩𝔬 𝕎𝕠𝕣𝕝𝕕",
    ]
    rng = random.Random(1234)
    pool = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + \
        list("     \n\t.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") + list("éüßçñøåæœ日本語中文한국어😀🎉👍€£¥—…«»") + \
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "  ", "\n\n", "'s", "'ll", " the", "123", "ing"]
    no_digits = [c for c in pool if not re.search(r"\d", c)]
    generated = ["".join(rng.choice(pool if i % 2 else no_digits) for _ in range(rng.randint(1, 60)))
                 for i in range(260)]
    return base + generated


CORPUS = _corpus()
# \p{N}, as the Digits pre-tokenizer sees numbers: "²", "½" and "Ⅻ" count too.
DIGIT_FREE = [s for s in CORPUS if not any(unicodedata.category(c).startswith("N") for c in s)]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12*7?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "Tell me a joke about 日本語 😀"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    [{"role": "user", "content": "  spaces \n and newlines \n\n"}],
]

# ---------------------------------------------------------------- parity with transformers


def test_corpus_is_varied():
    assert len(CORPUS) >= 300 and len(DIGIT_FREE) >= 100


def test_matches_transformers_gguf_tokenizer_on_digit_free_text(ours, hf_gguf_tokenizer):
    mismatches = [s for s in DIGIT_FREE
                  if ours.encode(s) != hf_gguf_tokenizer(s, add_special_tokens=False)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]!r}"


def test_matches_digit_splitting_reference_on_all_text(ours, reference_backend):
    mismatches = [s for s in CORPUS if ours.encode(s) != reference_backend.encode(s, add_special_tokens=False).ids]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]!r}"


def test_digits_are_split_individually_like_llama_cpp(ours):
    # llama.cpp's "smollm" pre-type splits "\p{N}" first: each digit its own token.
    ids = ours.encode("Hello world 12345")
    assert [ours.decode([i]) for i in ids] == ["Hello", " world", " ", "1", "2", "3", "4", "5"]


def test_encode_batch_matches_encode(ours):
    assert ours.encode_batch(CORPUS[:50]) == [ours.encode(s) for s in CORPUS[:50]]


def test_special_tokens_in_text_are_single_ids(ours):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.token_to_id("<|im_start|>") == 1
    assert ids[-1] == ours.token_to_id("<|im_end|>") == 2


def test_decode_round_trips(ours):
    bad = [s for s in CORPUS if ours.decode(ours.encode(s), skip_special_tokens=False) != s]
    assert not bad, bad[:3]


def test_decode_matches_transformers(ours, hf_gguf_tokenizer):
    for s in CORPUS[::7]:
        ids = ours.encode(s)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                hf_gguf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_ids_and_attributes(ours, hf_gguf_tokenizer):
    assert ours.vocab_size == len(hf_gguf_tokenizer) == 49152
    assert ours.bos_token_id == 1 and ours.eos_token_id == 2 and ours.pad_token_id == 2
    assert ours.unk_token_id == 0
    assert ours.stop_token_ids == [2]  # eos is <|im_end|>, which is also the template's end of turn
    assert ours.add_bos_token is False
    assert ours.encode("hi", add_special_tokens=True) == hf_gguf_tokenizer("hi")["input_ids"]
    assert ours.id_to_token(2) == "<|im_end|>" and ours.token_to_id("<|endoftext|>") == 0


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(ours, hf_gguf_tokenizer, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_errors(ours, default_gguf_path):
    with pytest.raises(ThriftyError, match=r"message 1 .*no 'content'"):
        ours.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant"}])
    with pytest.raises(ThriftyError, match=r"message 0 has no 'role'"):
        ours.apply_chat_template([{"content": "x"}])
    no_template = Tokenizer(backend=ours.backend, eos_token_id=2, source=str(default_gguf_path))
    with pytest.raises(ThriftyError, match="no chat template.*--no-chat"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_transformers_features(ours):
    """raise_exception, tojson without HTML escaping, loop controls, kwargs, {% generation %}."""
    template = (
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}"
        "{{ bos_token }}|{{ eos_token }}|{{ custom }}|{{ tools | tojson }}"
    )
    tok = Tokenizer(backend=ours.backend, eos_token_id=2, bos_token_id=1, chat_template=template)
    text = tok.apply_chat_template([{"role": "user", "content": "<a & b> é"}] * 3, custom="K",
                                   tools=[{"name": "f"}])
    assert text == '"<a & b> é""<a & b> é"<|im_start|>|<|im_end|>|K|[{"name": "f"}]'
    with pytest.raises(ThriftyError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])


def test_end_of_turn_token_becomes_a_stop_id(ours):
    # A ChatML template whose eos differs from the end-of-turn token (as in many Qwen/Llama 3 files).
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    tok = Tokenizer(backend=ours.backend, eos_token_id=0, chat_template=template, stop_token_ids=[5])
    assert tok.stop_token_ids == [0, 5, 2]
    assert tok.pad_token_id == 0


# ---------------------------------------------------------------- save / load


@pytest.fixture(scope="module")
def saved_dir(ours, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    ours.save(directory)
    return directory


def test_saved_directory_loads_in_transformers(ours, saved_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(saved_dir)
    sample = CORPUS[::3]
    assert [hf(s, add_special_tokens=False)["input_ids"] for s in sample] == [ours.encode(s) for s in sample]
    assert [hf(s)["input_ids"] for s in sample[:20]] == [ours.encode(s, add_special_tokens=True) for s in sample[:20]]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    for messages in CONVERSATIONS:
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            ours.apply_chat_template(messages)


def test_from_hf_dir_round_trip(ours, saved_dir):
    again = Tokenizer.from_hf_dir(saved_dir)
    assert [again.encode(s) for s in CORPUS] == [ours.encode(s) for s in CORPUS]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "stop_token_ids",
                 "chat_template", "vocab_size", "add_bos_token", "add_eos_token"):
        assert getattr(again, attr) == getattr(ours, attr), attr
    assert again.special_token_ids() == ours.special_token_ids()


def test_from_hf_dir_reads_config_variants(saved_dir, tmp_path):
    """Dict-form special tokens, chat_template.jinja overriding the config, generation_config
    eos lists, and a tokenizer.json post-processor that adds bos."""
    d = tmp_path / "variant"
    shutil.copytree(saved_dir, d)
    backend = BackendTokenizer.from_file(str(d / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(d / "tokenizer.json"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    config["pad_token"] = None
    config["chat_template"] = "IGNORED"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}<|endoftext|>{% endfor %}")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_hf_dir(d)
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2
    assert tok.stop_token_ids == [2, 7, 0]  # eos, generation_config, template end of turn
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x<|endoftext|>"
    assert tok.add_bos_token and tok.encode("hi", add_special_tokens=True)[0] == 1
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(d)("hi")["input_ids"] == tok.encode("hi", add_special_tokens=True)
    # ...and saving it again keeps exactly one bos in transformers too.
    tok.save(tmp_path / "again")
    assert AutoTokenizer.from_pretrained(tmp_path / "again")("hi")["input_ids"] == \
        tok.encode("hi", add_special_tokens=True)


def test_from_hf_dir_errors(saved_dir, tmp_path):
    with pytest.raises(ThriftyError, match=r"tokenizer\.json: not found"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(ThriftyError, match=r"tokenizer\.json: could not be read"):
        Tokenizer.from_hf_dir(tmp_path)
    shutil.copy(saved_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",\n oops}')
    with pytest.raises(ThriftyError, match=r"tokenizer_config\.json: line 2: invalid JSON"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ThriftyError, match="no usable 'eos_token'"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------- SentencePiece ("llama") GGUF vocabularies


def _write_vocab_gguf(path: Path, model: str, tokens: list[str], types: list[int], **keys) -> Path:
    """A GGUF holding only a tokenizer (and a placeholder tensor)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    """A tiny SPM vocabulary (tokenizer.ggml.model = "llama", as in Llama 2 / Mistral GGUFs):
    scored pieces, byte-fallback tokens, control tokens."""
    from transformers import AutoTokenizer

    pieces = ["\u2581", "a", "b", "c", "d", "e", "h", "l", "o", "r", "t", "w", "s", "i", "n", "g",
              "\u2581t", "he", "\u2581the", "ll", "\u2581he", "llo", "\u2581hello", "\u2581w", "or", "\u2581wor",
              "ld", "\u2581world", "in", "ing", "\u2581s", "\u2581sing", "\u2581\u2581", "\u2581\u2581\u2581"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    path = _write_vocab_gguf(tmp_path / "spm.gguf", "llama", tokens, types, token_scores=scores,
                             bos_token_id=1, eos_token_id=2, unk_token_id=0)

    ours = tokenizer_from_gguf(open_gguf(path), path)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["hello world", " hello  world", "the thing sings", "héllo 日本 world!", "hello</s>world",
             "<s>the", "  ", "", "\n", "wing", "a b c d e"]
    for text in texts:
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, add_special_tokens=True) == hf(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == hf.decode(ours.encode(text), skip_special_tokens=True), text
    assert ours.add_bos_token and ours.bos_token_id == 1 and ours.stop_token_ids == [2]
    assert ours.decode(ours.encode("héllo 日本 world")) == "héllo 日本 world"


def test_gguf_tokenizer_errors_and_warnings(tmp_path):
    tokens, types = ["a", "b", "</s>"], [1, 1, 3]
    bad = _write_vocab_gguf(tmp_path / "bad.gguf", "gpt2", tokens, types, token_merges=["a b"], eos_token_id=2)
    with pytest.raises(ThriftyError, match=r"bad\.gguf: tokenizer\.ggml\.merges does not fit"):
        tokenizer_from_gguf(open_gguf(bad), bad)
    tokens, types = ["a", "b", "</s>", "ab"], [1, 1, 3, 1]
    bert = _write_vocab_gguf(tmp_path / "bert.gguf", "bert", tokens, types, eos_token_id=2)
    with pytest.raises(ThriftyError, match=r"bert\.gguf: tokenizer type 'bert' .*not supported"):
        tokenizer_from_gguf(open_gguf(bert), bert)
    no_eos = _write_vocab_gguf(tmp_path / "noeos.gguf", "gpt2", tokens, types, token_merges=["a b"])
    with pytest.raises(ThriftyError, match=r"noeos\.gguf: tokenizer\.ggml\.eos_token_id is missing"):
        tokenizer_from_gguf(open_gguf(no_eos), no_eos)
    odd = _write_vocab_gguf(tmp_path / "odd.gguf", "gpt2", tokens, types, token_merges=["a b"],
                            eos_token_id=2, tokenizer_pre="some-future-pre")
    with pytest.warns(UserWarning, match="unknown pre-tokenizer type 'some-future-pre'"):
        tok = tokenizer_from_gguf(open_gguf(odd), odd)
    assert tok.encode("ab</s>b") == [3, 2, 1]
