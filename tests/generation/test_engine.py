"""The generation engine against transformers and against itself (batching, caching)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.build import build_model
from thrifty.formats.hf import load_hf_config, load_hf_state_dict
from thrifty.generation.engine import generate, generate_tokens, render_prompt
from thrifty.generation.sampling import SamplingParams

from tiny_models import make_hf_model, save_hf_model

GREEDY = SamplingParams(temperature=0.0)
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "What is 12 * 7? Answer with a number.",
    "List three primary colors.",
]


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_equals_transformers_on_default_model(default_model_fp32, hf_gguf_model) -> None:
    model, tokenizer = default_model_fp32
    for prompt in CHAT_PROMPTS:
        ids = render_prompt(tokenizer, prompt, chat=True, system_prompt=None)
        expected = hf_greedy(hf_gguf_model, ids, 48, tokenizer.eos_token_id)
        (got,), (reason,) = generate_tokens(model, [ids], max_new_tokens=48, sampling=GREEDY,
                                             stop_token_ids=[tokenizer.eos_token_id])
        assert got == expected, prompt
        assert reason == ("stop" if got[-1] == tokenizer.eos_token_id else "length")


def test_chat_answer_is_correct(default_model_fp32) -> None:
    model, tokenizer = default_model_fp32
    (completion,) = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=30)
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"
    assert completion.token_ids[-1] in tokenizer.stop_token_ids


def test_batched_mixed_lengths_equal_one_by_one(default_model_fp32) -> None:
    model, tokenizer = default_model_fp32
    # Eight rows: the first to finish stays in the batch (rows leave it a quarter at a time).
    prompts = CHAT_PROMPTS + ["Say hi.", "Name a planet.", "What is 2 + 2?", "Describe the sea in one sentence."]
    prompt_ids = [render_prompt(tokenizer, p, True, None) for p in prompts]
    assert len({len(p) for p in prompt_ids}) > 1  # really mixed lengths
    batched, batched_reasons = generate_tokens(model, prompt_ids, max_new_tokens=32, sampling=GREEDY,
                                               stop_token_ids=tokenizer.stop_token_ids)
    assert len({len(ids) for ids, reason in zip(batched, batched_reasons) if reason == "stop"}) >= 3
    for ids, got, reason in zip(prompt_ids, batched, batched_reasons):
        (alone,), (alone_reason,) = generate_tokens(model, [ids], max_new_tokens=32, sampling=GREEDY,
                                                    stop_token_ids=tokenizer.stop_token_ids)
        assert got == alone
        assert reason == alone_reason


def test_kv_cache_decoding_equals_full_recomputation(default_model_fp32) -> None:
    model, tokenizer = default_model_fp32
    ids = render_prompt(tokenizer, "Tell me a story about a robot.", True, None)
    (generated,), _ = generate_tokens(model, [ids], max_new_tokens=24, sampling=GREEDY)
    full = torch.tensor([ids + generated])
    with torch.no_grad():
        logits = model(full)[0, len(ids) - 1:-1]
    # Each cached decoding step chose the argmax of what a full forward pass computes.
    assert logits.argmax(-1).tolist() == generated


def test_group_prefill_matches_separate_prompts(default_model_fp32) -> None:
    model, tokenizer = default_model_fp32
    ids = render_prompt(tokenizer, "Name a fruit.", True, None)
    (single,), _ = generate_tokens(model, [ids], max_new_tokens=12, sampling=GREEDY)
    grouped, _ = generate_tokens(model, [ids], max_new_tokens=12, sampling=GREEDY, num_return_sequences=3)
    assert grouped == [single] * 3


def test_sampling_is_reproducible_with_seed(default_model_fp32) -> None:
    model, tokenizer = default_model_fp32
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, num_return_sequences=4)
    first = generate(model, tokenizer, ["Say something.", "Pick a colour."], seed=7, **kwargs)
    again = generate(model, tokenizer, ["Say something.", "Pick a colour."], seed=7, **kwargs)
    other = generate(model, tokenizer, ["Say something.", "Pick a colour."], seed=8, **kwargs)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert [(c.prompt_index, c.sample_index) for c in first] == [(p, s) for p in range(2) for s in range(4)]
    # Samples of one prompt differ from each other: each row has its own randomness.
    assert len({tuple(c.token_ids) for c in first[:4]}) > 1


def test_stop_string_and_length_limit(default_model_fp32) -> None:
    model, tokenizer = default_model_fp32
    (full,) = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=30)
    assert "Paris" in full.text
    (cut,) = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=30, stop=["Paris"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index("Paris")]
    (short,) = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=3)
    assert short.finish_reason == "length" and len(short.token_ids) == 3


def test_min_new_tokens_holds_back_stop_tokens_as_transformers(tmp_path: Path) -> None:
    reference = save_hf_model("llama", tmp_path)
    ours = build_model(load_hf_config(tmp_path), load_hf_state_dict(tmp_path), str(tmp_path)).eval()
    prompt = torch.randint(3, 97, (5,), generator=torch.Generator().manual_seed(4)).tolist()
    (free,), _ = generate_tokens(ours, [prompt], max_new_tokens=12, sampling=GREEDY)
    stop = free[1]  # a stop token greedy decoding reaches at the second token
    (early,), reasons = generate_tokens(ours, [prompt], max_new_tokens=12, sampling=GREEDY, stop_token_ids=[stop])
    assert reasons == ["stop"] and len(early) <= 2
    (held,), _ = generate_tokens(ours, [prompt], max_new_tokens=12, sampling=GREEDY, stop_token_ids=[stop],
                                 min_new_tokens=6)
    ids = torch.tensor([prompt])
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=6,
                                  do_sample=False, eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
    assert held == expected and len(held) >= 6 and stop not in held[:6]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma3"])
def test_left_padded_batch_equals_transformers_greedy(family: str, tmp_path: Path) -> None:
    """Tiny models: mixed prompt lengths, enough tokens to cross Mistral's and Gemma 3's local layers' windows."""
    reference = save_hf_model(family, tmp_path)
    ours = build_model(load_hf_config(tmp_path), load_hf_state_dict(tmp_path), str(tmp_path)).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (3, 9, 6)]
    got, _ = generate_tokens(ours, prompts, max_new_tokens=12, sampling=GREEDY)
    for ids, tokens in zip(prompts, got):
        assert tokens == hf_greedy(reference, ids, 12, eos=None)


def test_bfloat16_model_tracks_float32(default_model_fp32, default_gguf_path) -> None:
    """bf16 is the default dtype: its predictions must stay those of the fp32 model."""
    from thrifty.formats.loader import load_model

    model32, tokenizer = default_model_fp32
    model16, _ = load_model(default_gguf_path, dtype="bfloat16", device="cpu")
    ids = torch.tensor([render_prompt(tokenizer, "Explain why the sky is blue, in two sentences.", True, None)])
    with torch.no_grad():
        logits32, logits16 = model32(ids)[0], model16(ids)[0].float()
    agreement = (logits32.argmax(-1) == logits16.argmax(-1)).float().mean().item()
    assert agreement >= 0.9
    (answer,) = generate(model16, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer.text


def biased_qwen2(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A tiny qwen2 model with head_dim 64 (the native decoding attention's size) whose
    q/k biases put every attention score near -100, as the real Qwen2.5's k bias does:
    the scores a partial-vector max once turned into NaN logits in bf16."""
    reference = make_hf_model("qwen2", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=96)
    with torch.no_grad():
        for layer in reference.model.layers:
            # Along RoPE's slowest-turning pairs (the last of each half), so the score stays
            # near -100 at every distance between query and key.
            direction = torch.zeros(64)
            direction[[28, 29, 30, 31, 60, 61, 62, 63]] = torch.tensor([1.0, -1, 1, 1, -1, 1, 1, -1]) / 8**0.5
            layer.self_attn.q_proj.bias.copy_((20 * direction).repeat(2))
            layer.self_attn.k_proj.bias.copy_(-40 * direction)  # q.k ~ -800 / sqrt(64) = -100
    reference.save_pretrained(tmp_path)
    return reference


def test_bf16_generation_with_scores_near_minus_100_follows_the_reference(tmp_path: Path) -> None:
    reference = biased_qwen2(tmp_path)
    ours = build_model(load_hf_config(tmp_path), load_hf_state_dict(tmp_path), str(tmp_path)).eval()
    ours = ours.to(torch.bfloat16)
    prompts = [torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 16, 33)]
    got, _ = generate_tokens(ours, prompts, max_new_tokens=20, sampling=GREEDY)
    for ids, tokens in zip(prompts, got):
        with torch.no_grad():
            logits = reference(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].double()
            attention = reference.model.layers[0].self_attn
        assert attention.q_proj.bias[:64] @ attention.k_proj.bias / 8 < -90  # the regime of the bug
        # Each greedy bf16 pick is the float32 model's argmax or within bf16 noise of it.
        chosen = logits.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        assert (chosen >= logits.amax(-1) - 0.05 * logits.std(-1)).all(), tokens


def test_non_finite_logits_stop_generation_with_a_clear_error(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    ours = build_model(load_hf_config(tmp_path), load_hf_state_dict(tmp_path), str(tmp_path)).eval()
    with torch.no_grad():
        ours.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ThriftyError, match=r"NaN or infinite logits at new token 1 .*THRIFTY_NATIVE=0"):
        generate_tokens(ours, [[5, 6, 7]], max_new_tokens=5, sampling=GREEDY)
