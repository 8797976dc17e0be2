"""Unsloth's FastLanguageModel switches, each checked for what it changes: load_in_8bit
(an int8 base under the adapters), full_finetuning (every weight trains), for_inference /
for_training (dropout and checkpointing as Unsloth sets them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thrifty import FastLanguageModel, SFTConfig, SFTTrainer
from thrifty.layers.lora import lora_layers
from thrifty.layers.quant import Int8Linear, NF4Linear

from tiny_tokenizer import save_tiny_model_dir, tiny_sft_rows


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    save_tiny_model_dir("llama", tmp_path / "model")
    return tmp_path / "model"


def args(tmp_path: Path, **more) -> SFTConfig:  # type: ignore[no-untyped-def]
    return SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                     save_steps=0, disable_tqdm=True, **more)


def test_load_in_8bit_trains_adapters_on_a_frozen_int8_base(tiny_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_dir), load_in_8bit=True)
    layers = [m for m in model.causal_lm.modules() if isinstance(m, (Int8Linear, NF4Linear))]
    assert layers and all(isinstance(m, Int8Linear) for m in layers)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    frozen = {k: v.clone() for k, v in model.causal_lm.state_dict().items() if "lora_" not in k}
    said: list[str] = []
    SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=tiny_sft_rows(), args=args(tmp_path),
               log=said.append).train()
    assert any("QLoRA (int8)" in line for line in said)  # the method is read off the model, once
    after = model.causal_lm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the int8 base did not move
    assert any(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_layers(model.causal_lm))  # adapters did


def test_full_finetuning_trains_every_weight(tiny_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_dir), dtype=torch.float32, full_finetuning=True)
    assert all(p.requires_grad for p in model.causal_lm.parameters())
    before = {k: v.clone() for k, v in model.causal_lm.state_dict().items()}
    said: list[str] = []
    SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=tiny_sft_rows(), args=args(tmp_path, dtype="float32"),
               log=said.append).train()
    assert any("full fine-tuning" in line for line in said)
    after = model.causal_lm.state_dict()
    moved = [k for k in before if not torch.equal(after[k], before[k])]
    assert any("mlp.down_proj" in k for k in moved) and any("self_attn.q_proj" in k for k in moved)
    with pytest.raises(Exception, match="full_finetuning trains every weight"):
        FastLanguageModel.from_pretrained(str(tiny_dir), load_in_4bit=True, full_finetuning=True)


def test_for_inference_and_for_training(tiny_dir: Path) -> None:
    model, _ = FastLanguageModel.from_pretrained(str(tiny_dir), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.5,
                                             use_gradient_checkpointing=False)
    with torch.no_grad():
        for _, layer in lora_layers(model.causal_lm):
            layer.lora_B.weight.normal_(0, 0.5)  # so dropout on the branch shows in the logits
    ids = torch.tensor([[3, 26, 24, 10, 23, 43]])
    FastLanguageModel.for_training(model, use_gradient_checkpointing=True)
    assert model.causal_lm.training and model.gradient_checkpointing
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout draws anew each call
    FastLanguageModel.for_inference(model)
    assert not model.causal_lm.training
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # no dropout
