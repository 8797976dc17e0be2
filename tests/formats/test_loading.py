"""Loading tensor by tensor: a base quantized as it is read equals one quantized after a
full load, bit for bit; a GGUF kept in its own blocks computes the dequantized model's
logits (to float32 rounding) and trains LoRA adapters on them (`quantize: gguf`), and
the adapter merges onto the dequantized base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.gguf_export import export_gguf
from thrifty.formats.loader import load_model
from thrifty.formats.open_model import open_model
from thrifty.layers.gguf_quant import GGUFEmbedding, GGUFLinear
from thrifty.layers.lora import lora_layers
from thrifty.layers.quant import quantize_model
from thrifty.sft.config import SFTConfig
from thrifty.sft.trainer import SFTTrainer

from tiny_tokenizer import save_tiny_model_dir, tiny_byte_level_model, tiny_sft_rows


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_as_read_equals_quantized_after(method: str, tmp_path: Path) -> None:
    save_tiny_model_dir("qwen2", tmp_path)  # q/k/v biases: a layer is quantized once its bias is in too
    streamed, _ = load_model(tmp_path, dtype="bfloat16", device="cpu", quantize=method)
    after, _ = load_model(tmp_path, dtype="bfloat16", device="cpu")
    quantize_model(after, method)
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(streamed.model.layers[0].self_attn.q_proj) is type(after.model.layers[0].self_attn.q_proj)
    assert type(streamed.lm_head) is torch.nn.Linear  # the head stays in full precision


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    model, tokenizer = tiny_byte_level_model("llama", tmp_path / "hf")  # llama: q/k rows permuted in the file
    return export_gguf(model, tokenizer, tmp_path / "tiny-q4_k_m.gguf", "q4_k_m")


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases beside the blocks
def test_a_gguf_from_its_blocks_computes_the_dequantized_model(family: str, tmp_path: Path) -> None:
    model, tokenizer = tiny_byte_level_model(family, tmp_path / "hf")
    tiny_gguf = export_gguf(model, tokenizer, tmp_path / "tiny-q4_k_m.gguf", "q4_k_m")
    blocks, tokenizer = load_model(tiny_gguf, dtype="float32", device="cpu", quantize="gguf")
    dense, _ = load_model(tiny_gguf, dtype="float32", device="cpu")
    assert isinstance(blocks.model.embed_tokens, GGUFEmbedding)
    layer = blocks.model.layers[0]
    assert all(isinstance(m, GGUFLinear) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj))
    # The blocks hold what the dense load dequantized (q/k rows un-permuted alike).
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        torch.testing.assert_close(blocks.model.layers[1].get_submodule(name).dequantize(torch.float32),
                                   dense.model.layers[1].get_submodule(name).weight, rtol=0, atol=1e-6)
    if family == "qwen2":
        assert torch.equal(blocks.model.layers[1].self_attn.k_proj.bias, dense.model.layers[1].self_attn.k_proj.bias)
    ids = torch.tensor([tokenizer.encode("hello world, twelve tokens or so")])
    with torch.no_grad():
        for rows in (ids[:, :5], ids):  # the decoding kernel (a few rows) and dequantized panels
            got, want = blocks(rows), dense(rows)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()
    with pytest.raises(ThriftyError, match="Hugging Face directory"):
        load_model(tiny_gguf.parent / "hf", quantize="gguf")


def test_quantize_gguf_trains_lora_on_the_files_blocks(tiny_gguf: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(tiny_gguf, dtype="float32", device="cpu", quantize="gguf")
    frozen = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("blocks")}
    said: list[str] = []
    config = SFTConfig(model_name_or_path=str(tiny_gguf), quantize="gguf", dtype="float32", lora_r=4, lora_alpha=8,
                       max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3, save_steps=0,
                       output_dir=str(tmp_path / "run"), disable_tqdm=True, eval_split=0.0, sample_prompts=[])
    result = SFTTrainer(model, tokenizer, config, train_dataset=tiny_sft_rows(), log=said.append).train()
    assert any("QLoRA (gguf)" in line for line in said)
    # Every block stayed in place and did not move: the decoder's under the adapters, and
    # the embedding and head, which the loss multiplies by in their blocks (no dense copy).
    now = {name.replace(".base_layer", ""): b for name, b in model.named_buffers()}  # LoRA wraps the layers
    assert set(frozen) <= set(now) and all(torch.equal(now[name], frozen[name]) for name in frozen)
    assert len(frozen) >= 7 * 2 + 1  # 7 projections per layer, the embedding (and an untied head)
    assert isinstance(model.model.embed_tokens, GGUFEmbedding) and isinstance(model.lm_head, GGUFLinear)
    layers = dict(lora_layers(model))
    assert layers and all(isinstance(layer.base_layer, GGUFLinear) for layer in layers.values())
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in layers.values())
    # Merging folds the adapter into the dequantized base: the merged model computes what
    # the trained one does.
    merged, _, _ = open_model(str(tiny_gguf), result.output_path, merge=True, dtype=None)
    ids = torch.tensor([tokenizer.encode("say hello")])
    with torch.no_grad():
        got, want = merged(ids), model.eval()(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
