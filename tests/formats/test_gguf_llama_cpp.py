"""llama.cpp itself (through llama-cpp-python) judges Thrifty's GGUF exports of the
default model: it loads every type Thrifty writes, tokenizes the chat prompt its own
way the same as Thrifty, and its greedy answer (through its own chat handling of the
embedded template too) is Thrifty's."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from llama_cpp import Llama

from thrifty.formats.gguf_export import export_gguf
from thrifty.generation.engine import generate_tokens, render_prompt
from thrifty.generation.sampling import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.", "What is 12 * 7?"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, default_model_fp32) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    model, tokenizer = default_model_fp32
    directory = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(model, tokenizer, directory / f"smollm2-{q}.gguf", q) for q in ("f32", "f16", "bf16", "q8_0")}


@pytest.mark.parametrize("quantization, tokens", [("f32", 24), ("f16", 8), ("bf16", 6), ("q8_0", 6)])
def test_llama_cpp_answers_as_thrifty(quantization: str, tokens: int, exports, default_model_fp32) -> None:  # type: ignore[no-untyped-def]
    """The same greedy tokens: all 24 compared for f32 (the same weights); for the rounded
    types the first few, where rounding has not yet tipped a near tie."""
    model, tokenizer = default_model_fp32
    llm = Llama(model_path=str(exports[quantization]), n_ctx=512, n_threads=2, verbose=False)
    for prompt in PROMPTS:
        ids = render_prompt(tokenizer, prompt, chat=True, system_prompt=None)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # llama.cpp's own tokenizer
        (ours,), _ = generate_tokens(model, [ids], max_new_tokens=tokens, sampling=SamplingParams())
        theirs = list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), len(ours)))
        assert theirs == ours, (quantization, prompt, tokenizer.decode(theirs), tokenizer.decode(ours))


def test_llama_cpp_chat_uses_the_embedded_template(exports, default_model_fp32) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = default_model_fp32
    llm = Llama(model_path=str(exports["f32"]), n_ctx=512, n_threads=2, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": PROMPTS[0]}], temperature=0.0, max_tokens=24)
    ids = render_prompt(tokenizer, PROMPTS[0], chat=True, system_prompt=None)
    (ours,), _ = generate_tokens(model, [ids], max_new_tokens=24, sampling=SamplingParams(),
                                 stop_token_ids=tokenizer.stop_token_ids)
    assert reply["choices"][0]["message"]["content"].strip() == tokenizer.decode(ours).strip()
    assert "Paris" in reply["choices"][0]["message"]["content"]
