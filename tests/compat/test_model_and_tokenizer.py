"""The transformers-style model and tokenizer against transformers and PEFT themselves,
on the same files: the default model written as a Hugging Face directory (float32)."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers

from thrifty import AutoModelForCausalLM, AutoTokenizer, LoraConfig, get_peft_model
from thrifty.errors import ThriftyError
from thrifty.formats.hf_export import save_hf_model
from thrifty.formats.loader import load_model

from tiny_models import randomise_adapters

TEXTS = ["The capital of France is", "Two plus two equals four, and three plus three"]
CHAT = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, default_model_fp32) -> Path:  # type: ignore[no-untyped-def]
    return save_hf_model(*default_model_fp32, tmp_path_factory.mktemp("default-hf"))


@pytest.fixture(scope="module")
def theirs(hf_dir: Path):  # type: ignore[no-untyped-def]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def ours(hf_dir: Path):  # type: ignore[no-untyped-def]
    return AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32), AutoTokenizer.from_pretrained(hf_dir)


# ---------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenizer_call_equals_transformers(ours, theirs, side: str) -> None:  # type: ignore[no-untyped-def]
    (_, tok), (_, ref) = ours, theirs
    tok.padding_side = ref.padding_side = side
    for kwargs in ({}, {"padding": True}, {"truncation": True, "max_length": 4}, {"add_special_tokens": False},
                   {"padding": "max_length", "max_length": 16}):
        mine, expected = tok(TEXTS, **kwargs), ref(TEXTS, **kwargs)
        assert mine["input_ids"] == expected["input_ids"] and mine["attention_mask"] == expected["attention_mask"]
    assert tok(TEXTS[0])["input_ids"] == ref(TEXTS[0])["input_ids"]
    mine, expected = tok(TEXTS, padding=True, return_tensors="pt"), ref(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(mine.input_ids, expected.input_ids) and torch.equal(mine.to("cpu").attention_mask,
                                                                           expected.attention_mask)


def test_apply_chat_template_equals_transformers(ours, theirs) -> None:  # type: ignore[no-untyped-def]
    (_, tok), (_, ref) = ours, theirs
    for kwargs in ({"tokenize": False}, {"tokenize": False, "add_generation_prompt": True},
                   {"add_generation_prompt": True, "return_dict": False}):
        assert tok.apply_chat_template(CHAT, **kwargs) == ref.apply_chat_template(CHAT, **kwargs), kwargs
    mine = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    expected = ref.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    assert torch.equal(mine["input_ids"], expected["input_ids"])
    assert torch.equal(mine["attention_mask"], expected["attention_mask"])
    batch = [CHAT, [{"role": "user", "content": "Hi"}]]
    assert tok.apply_chat_template(batch, tokenize=False) == ref.apply_chat_template(batch, tokenize=False)


def test_decode_and_batch_decode_equal_transformers(ours, theirs) -> None:  # type: ignore[no-untyped-def]
    (_, tok), (_, ref) = ours, theirs
    ids = ref.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        rows = [ids, ids[:5]]
        assert tok.batch_decode(rows, skip_special_tokens=skip) == ref.batch_decode(rows, skip_special_tokens=skip)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == (ref.eos_token, ref.eos_token_id, ref.pad_token_id)


def test_tokenizer_save_pretrained_loads_in_transformers(ours, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, tok = ours
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    assert again.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_loss_and_logits_equal_transformers(ours, theirs, side: str) -> None:  # type: ignore[no-untyped-def]
    (model, _), (ref, ref_tok) = ours, theirs
    ref_tok.padding_side = side
    batch = ref_tok(TEXTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if side == "left":  # the first real token is predicted from a padding position (see model.forward)
        labels[:, 1:].masked_fill_(batch["attention_mask"][:, :-1] == 0, -100)
    mine = model(**batch, labels=labels)
    with torch.no_grad():
        expected = ref(**batch, labels=labels)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(mine.logits[real], expected.logits[real], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(mine.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert mine[0] is mine.loss


def test_generate_greedy_equals_transformers(ours, theirs) -> None:  # type: ignore[no-untyped-def]
    (model, tok), (ref, ref_tok) = ours, theirs
    ref_tok.padding_side = tok.padding_side = "left"
    prompts = [ref_tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is the capital of France?", "Name a colour.", "Say hi")]
    batch = ref_tok(prompts, padding=True, return_tensors="pt")
    mine = model.generate(**batch, max_new_tokens=24, do_sample=False)
    with torch.no_grad():
        expected = ref.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=ref_tok.pad_token_id)
    assert torch.equal(mine, expected)
    one = tok(prompts[:1], return_tensors="pt")
    sampled = [model.generate(**one, max_new_tokens=8, do_sample=True, temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    assert torch.equal(sampled[0][:, :one["input_ids"].shape[1]], one["input_ids"])


def test_lora_model_matches_peft(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """get_peft_model + print_trainable_parameters as PEFT prints them; the saved adapter
    gives PEFT the same logits; merge_and_unload keeps them; a wrong field is named."""
    config = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), LoraConfig(**config))
    reference = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                    peft.LoraConfig(**config))
    capsys.readouterr()
    model.print_trainable_parameters()
    reference.print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.strip().splitlines()
    assert mine == theirs
    randomise_adapters(model.causal_lm)  # PEFT starts lora_B at zero: nothing to compare
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    logits = model(ids).logits.detach()
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, atol=2e-4, rtol=1e-4)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits.detach(), logits, atol=2e-4, rtol=1e-4)
    with pytest.raises(ThriftyError, match="use_qalora"):
        LoraConfig(r=8, use_qalora=True)
    with pytest.raises(ThriftyError, match="task_type"):
        LoraConfig(task_type="SEQ_CLS")


def test_save_pretrained_merged_and_gguf(hf_dir: Path, tmp_path: Path) -> None:
    """merged_16bit: a Hugging Face directory transformers loads, the adapter folded in;
    GGUF: Thrifty reads the file back with the same greedy answer; 4-bit checkpoints are refused."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise_adapters(model.causal_lm)  # PEFT starts lora_B at zero: nothing to compare
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    logits = model(ids).logits.detach()
    model.save_pretrained_merged(tmp_path / "merged", save_method="merged_16bit")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert next(merged.parameters()).dtype == torch.float32
    # Each merged weight is W + s*B@A summed in float32 and rounded once to bf16 (an fp32
    # ulp of summation order may flip a rare tie): merging in bf16, or saving the base
    # without the delta, misses on most elements.
    lora = model.causal_lm.get_submodule("model.layers.0.mlp.down_proj")
    exact = lora.base_layer.weight + lora.scaling * lora.lora_B.weight @ lora.lora_A.weight
    saved = merged.get_submodule("model.layers.0.mlp.down_proj").weight
    assert (saved == exact.detach().bfloat16().float()).float().mean().item() >= 0.999
    with torch.no_grad():  # and the model computes with them: bf16 weights, bf16-sized error
        assert (merged(ids).logits - logits).abs().max() < 0.05 * logits.abs().max()
    (path,) = model.save_pretrained_gguf(tmp_path / "gguf", quantization_method="not_quantized")
    assert path.name == "gguf.F16.gguf" and (tmp_path / "gguf" / "Modelfile").is_file()
    back, _ = load_model(path, dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.equal(back(ids).argmax(-1), logits.argmax(-1))
    with pytest.raises(ThriftyError, match="merged_4bit_forced.*q4_k_m"):
        model.save_pretrained_merged(tmp_path / "x", save_method="merged_4bit_forced")


def test_generate_streams_to_a_transformers_streamer(ours, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """Unsloth's notebooks pass transformers' TextStreamer: it prints the reply as it comes."""
    model, tok = ours
    inputs = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    capsys.readouterr()
    out = model.generate(**inputs, streamer=transformers.TextStreamer(tok, skip_prompt=True), max_new_tokens=12)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
    assert capsys.readouterr().out.strip() == reply.strip() and reply.strip()
