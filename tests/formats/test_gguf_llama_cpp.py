"""llama.cpp itself (through llama-cpp-python) judges Thrifty's GGUF exports of the
default model: it loads every type Thrifty writes, tokenizes the chat prompt its own
way the same as Thrifty, and its greedy answer (through its own chat handling of the
embedded template too) is Thrifty's."""

from __future__ import annotations

import ctypes
import itertools
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp import Llama

from thrifty.formats.gguf_export import export_gguf
from thrifty.formats.loader import load_model
from thrifty.generation.engine import generate_tokens, render_prompt
from thrifty.generation.sampling import SamplingParams

from tiny_tokenizer import tiny_byte_level_model

FILE_TYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
              "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
              "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.", "What is 12 * 7?"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, default_model_fp32) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    model, tokenizer = default_model_fp32
    directory = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(model, tokenizer, directory / f"smollm2-{q}.gguf", q) for q in ("f32", "f16", "bf16")}


@pytest.mark.parametrize("quantization, tokens", [("f32", 24), ("f16", 8), ("bf16", 6)])
def test_llama_cpp_answers_as_thrifty(quantization: str, tokens: int, exports, default_model_fp32) -> None:  # type: ignore[no-untyped-def]
    """The same greedy tokens: all 24 compared for f32 (the same weights); for the rounded
    types the first few, where rounding has not yet tipped a near tie. (llama.cpp runs
    the quantized types with 8-bit activations too, so their answers are compared by
    perplexity below, not token for token.)"""
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


def llama_cpp_quantize(source: Path, target: Path, quantization: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quantization]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0


TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a screw press adapted from wine making. Books became cheaper, "
        "literacy spread across Europe, and scientists could share exact copies of their results.")


def llama_cpp_perplexity(path: Path, ids: list[int]) -> float:
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    logits = torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float64)
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())


@pytest.mark.parametrize("quantization", sorted(FILE_TYPES))
def test_thrifty_quantizes_as_llama_quantize(quantization: str, tmp_path: Path, default_model_fp32) -> None:  # type: ignore[no-untyped-def]
    """llama.cpp quantizes Thrifty's f16 file; Thrifty quantizes the same f16 values: the
    same type for every tensor and the same bytes, so llama.cpp answers both alike."""
    model, tokenizer = default_model_fp32
    rounded = type(model)(model.config)
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    f16 = export_gguf(rounded, tokenizer, tmp_path / "f16.gguf", "f16")
    llama_cpp_quantize(f16, tmp_path / "theirs.gguf", quantization)
    mine_path = export_gguf(rounded, tokenizer, tmp_path / "ours.gguf", quantization)
    ours = {t.name: t for t in gguf.GGUFReader(mine_path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].tensor_type == tensor.tensor_type, name
        mine, reference = np.asarray(ours[name].data).view(np.uint8), np.asarray(tensor.data).view(np.uint8)
        assert np.array_equal(mine, reference), (name, tensor.tensor_type.name, (mine != reference).mean())


def test_q8_0_perplexity_stays_near_float32(tmp_path: Path, default_model_fp32) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = default_model_fp32
    ids = tokenizer.encode(TEXT)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()
    float32 = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())
    path = export_gguf(model, tokenizer, tmp_path / "q8.gguf", "q8_0")
    q8 = llama_cpp_perplexity(path, ids)
    # Measured: -0.8% (llama.cpp also rounds the activations to 8 bits); f16: +0.03%.
    assert abs(q8 / float32 - 1) < 0.015, (q8, float32)
    # The weights' rounding alone (the file read back, float32 activations): measured +0.82%
    # on this text; llama.cpp's lower value is its 8-bit activations' rounding happening to help.
    back, _ = load_model(path, dtype="float32", device="cpu")
    with torch.no_grad():
        logits = back(torch.tensor([ids]))[0].double()
    weights_only = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())
    assert abs(weights_only / float32 - 1) < 0.012, (weights_only, float32)


@pytest.mark.parametrize("family", ["llama", "llama-tied", "llama3-scaled", "qwen2", "qwen3", "mistral", "smollm3"])
def test_llama_cpp_reads_every_family_as_thrifty_does(family: str, tmp_path: Path) -> None:
    """Tiny random models (q/k permutation, Llama 3 rope_freqs, qkv biases, q/k norms, tied
    head, SmolLM3's layer without RoPE): llama.cpp's logits for a sequence are Thrifty's on the same f32 file. Mistral's
    sequence stays inside its 5-token window, which llama.cpp's `llama` architecture does
    not apply."""
    model, tokenizer = tiny_byte_level_model(family, tmp_path / "hf")
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "f32")
    ids = tokenizer.encode("hello world 12")[: 5 if family == "mistral" else None]
    llm = Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    # llama.cpp keeps its KV cache in f16: keys and values rounded to 2^-11 (measured: up to 2e-4).
    assert torch.allclose(theirs, ours, atol=1e-3, rtol=0), (theirs - ours).abs().max()


def test_a_fine_tune_survives_the_trip_to_llama_cpp(tmp_path: Path, default_model_fp32) -> None:  # type: ignore[no-untyped-def]
    """The README's path: the shipped SFT example (briefly), then `thrifty export-gguf
    ADAPTER --quantization q4_k_m --ollama`; llama.cpp, through the embedded chat template,
    answers held-out questions in the learned "Answer: ..." style, which the base model
    does not use."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    run = [sys.executable, "-m", "thrifty"]
    trained = subprocess.run([*run, "sft", str(repo / "examples" / "sft_default.yaml"), "max_steps=20",
                              f"output_dir={tmp_path / 'sft'}", "save_steps=0", "eval_steps=100", "disable_tqdm=true"],
                             capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = subprocess.run([*run, "export-gguf", str(tmp_path / "sft" / "adapter"), "--output",
                               str(tmp_path / "model.gguf"), "--quantization", "q4_k_m", "--ollama"],
                              capture_output=True, text=True, timeout=900)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "ollama create model -f" in exported.stdout and (tmp_path / "Modelfile").is_file()
    llm = Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=512, n_threads=2, verbose=False)
    questions = ["What is 12 + 30?", "Which is larger, 7 or 19?", "Spell \"tiger\" in upper case."]
    replies = [llm.create_chat_completion([{"role": "user", "content": q}], temperature=0.0, max_tokens=16)
               ["choices"][0]["message"]["content"] for q in questions]
    assert all(r.strip().startswith("Answer:") for r in replies), replies
    model, tokenizer = default_model_fp32
    base = [c.text for c in generate_tokens_text(model, tokenizer, questions)]
    assert not any(b.strip().startswith("Answer:") for b in base), base


def generate_tokens_text(model, tokenizer, questions):  # type: ignore[no-untyped-def]
    from thrifty.generation.engine import generate

    return generate(model, tokenizer, questions, max_new_tokens=16)
