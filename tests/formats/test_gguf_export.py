"""GGUF files written by Thrifty: tiny models of every family (and the real default model)
written and read back give the same logits and tokens; quantized tensors are exactly the
gguf package's quantization; transformers' GGUF loader reads them; the CLI exports a
fine-tune (adapter merged on the fly) with an Ollama Modelfile; nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.gguf_export import export_gguf
from thrifty.formats.gguf_reader import metadata_value, open_gguf
from thrifty.formats.loader import load_model

from tiny_models import FAMILIES, load_ours, make_hf_model
from tiny_tokenizer import BYTE_LEVEL_VOCAB as VOCAB, byte_level_tokenizer, tiny_byte_level_model as tiny_model

TEXTS = ["Hello world, it's 2024!", "<|im_start|>user\nabc 123<|im_end|>", "Über café\n\n  x"]

def logits(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"gemma3"}))  # Gemma 3: refused, below
def test_f32_export_reads_back_exactly(family: str, tmp_path: Path) -> None:
    model, tokenizer = tiny_model(family, tmp_path / "hf")
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "f32")
    again, tokenizer_again = load_model(path, dtype="float32", device="cpu")
    assert again.config.model_type == model.config.model_type
    assert again.config.rope_scaling == model.config.rope_scaling
    assert again.config.tie_word_embeddings == model.config.tie_word_embeddings
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer_again.encode(text) == ids, text
        assert torch.equal(logits(again, ids), logits(model, ids))  # the q/k permutation undone exactly
    assert tokenizer_again.stop_token_ids == tokenizer.stop_token_ids
    assert tokenizer_again.chat_template == tokenizer.chat_template
    reader = open_gguf(path)
    assert metadata_value(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert metadata_value(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32


@pytest.mark.parametrize("quantization, tensor_type", [("f16", gguf.GGMLQuantizationType.F16),
                                                       ("bf16", gguf.GGMLQuantizationType.BF16),
                                                       ("q8_0", gguf.GGMLQuantizationType.Q8_0),
                                                       ("fast_quantized", gguf.GGMLQuantizationType.Q8_0),
                                                       ("q4_0", gguf.GGMLQuantizationType.Q4_0)])
def test_quantized_export_holds_the_quantized_weights(quantization: str, tensor_type: gguf.GGMLQuantizationType,
                                                      tmp_path: Path) -> None:
    model, tokenizer = tiny_model("qwen2", tmp_path / "hf")
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", quantization)
    types = {t.name: t.tensor_type for t in open_gguf(path).tensors}
    assert types["blk.0.attn_q.weight"] == tensor_type
    # qwen2's head is tied to the embedding: llama-quantize gives it Q6_K under q4_0, and
    # rows of 64 take Q6_K's fallback, Q8_0.
    head = gguf.GGMLQuantizationType.Q8_0 if quantization == "q4_0" else tensor_type
    assert types["token_embd.weight"] == head
    assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_q.bias"] == gguf.GGMLQuantizationType.F32
    again, _ = load_model(path, dtype="float32", device="cpu")
    weight = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(weight, tensor_type), tensor_type) \
        if tensor_type != gguf.GGMLQuantizationType.F16 else weight.astype(np.float16).astype(np.float32)
    assert np.array_equal(again.model.layers[1].mlp.up_proj.weight.detach().numpy(), expected)
    ids = tokenizer.encode(TEXTS[0])
    assert (logits(again, ids) - logits(model, ids)).abs().max() < 0.1 * logits(model, ids).abs().max()  # 4 bits: coarse


def test_transformers_reads_the_export(tmp_path: Path) -> None:
    import transformers

    model, tokenizer = tiny_model("llama", tmp_path / "hf")
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        assert torch.allclose(theirs(torch.tensor([ids])).logits[0], logits(model, ids), atol=1e-5)


def test_the_default_model_round_trips(tmp_path: Path, default_model_fp32, default_gguf_path: Path) -> None:
    model, tokenizer = default_model_fp32
    path = export_gguf(model, tokenizer, tmp_path / "smollm2.gguf", "f32")
    again, tokenizer_again = load_model(path, dtype="float32", device="cpu")
    source, written = open_gguf(default_gguf_path), open_gguf(path)
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "llama.rope.freq_base",
                "llama.attention.head_count_kv", "llama.context_length"):
        assert metadata_value(written, key) == metadata_value(source, key), key
    ids = tokenizer.encode("The capital of France is")
    assert torch.equal(logits(again, ids), logits(model, ids))


@pytest.mark.parametrize("quantization", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quant_exports_read_back_close(quantization: str, tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama", tmp_path / "hf")
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", quantization)
    types = {t.name: t.tensor_type.name for t in open_gguf(path).tensors}
    # 64-wide rows: no K-quant block fits, llama.cpp's fallbacks; 256-wide rows (ffn_down): the K-quant.
    assert types["blk.0.attn_q.weight"] == {"q4_k_m": "Q5_0", "q5_k_m": "Q5_1", "q6_k": "Q8_0"}[quantization]
    assert types["blk.1.ffn_down.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    again, _ = load_model(path, dtype="float32", device="cpu")
    for text in TEXTS:
        ids = tokenizer.encode(text)
        ours, theirs = logits(model, ids), logits(again, ids)
        assert (theirs - ours).abs().max() < 0.1 * ours.abs().max(), text


def test_bad_exports_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama", tmp_path / "hf")
    with pytest.raises(ThriftyError, match=r"q3_k_s.*not a GGUF type Thrifty writes"):
        export_gguf(model, tokenizer, tmp_path / "a.gguf", "q3_k_s")
    odd, odd_tokenizer = load_model(_odd_rows(tmp_path), dtype="float32", device="cpu")
    with pytest.raises(ThriftyError, match=r"ffn_down\.weight: rows of 112 values do not fill whole Q8_0 blocks"):
        export_gguf(odd, odd_tokenizer, tmp_path / "a.gguf", "q8_0")
    with pytest.raises(ThriftyError, match=r"ends in \.gguf"):
        export_gguf(model, tokenizer, tmp_path / "a.bin", "f16")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ThriftyError, match=r"a\.gguf: not written, 1 of \d+ tensors hold NaN"):
        export_gguf(model, tokenizer, tmp_path / "a.gguf", "f16")
    gemma, gemma_tokenizer = tiny_model("gemma3", tmp_path / "gemma")  # read from GGUF, not written yet
    with pytest.raises(ThriftyError, match=r"model_type 'gemma3_text' cannot be written as GGUF"):
        export_gguf(gemma, gemma_tokenizer, tmp_path / "a.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".a.gguf*"))


def _odd_rows(tmp_path: Path) -> Path:
    directory = tmp_path / "odd"
    make_hf_model("llama", vocab_size=VOCAB, bos_token_id=None, eos_token_id=263, pad_token_id=263,
                  intermediate_size=112).save_pretrained(directory)
    byte_level_tokenizer().save(directory)
    return directory


def test_cli_exports_a_fine_tune_with_an_ollama_modelfile(tmp_path: Path) -> None:
    from thrifty.formats.peft_adapter import save_adapter
    from thrifty.layers.lora import LoraConfig, apply_lora, merge_lora

    from tiny_models import randomise_adapters

    base = tmp_path / "base"
    tiny_model("qwen2", base)
    model = apply_lora(load_ours(base), LoraConfig(r=4, lora_alpha=8))
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", str(base))
    out = subprocess.run([sys.executable, "-m", "thrifty", "export-gguf", str(tmp_path / "adapter"), "--output",
                          str(tmp_path / "tuned.gguf"), "--quantization", "f32", "--ollama"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ollama create tuned -f" in out.stdout
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tuned.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    merged = merge_lora(model)
    exported, tokenizer = load_model(tmp_path / "tuned.gguf", dtype="float32", device="cpu")
    ids = tokenizer.encode(TEXTS[1])
    assert torch.allclose(logits(exported, ids), logits(merged, ids), atol=1e-5)


EXPORT_PEAK = """
import sys
from pathlib import Path
from thrifty.formats.gguf_export import export_gguf
from thrifty.formats.loader import load_model

def peak() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

model, tokenizer = load_model(None, dtype="bfloat16")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
Path("/proc/self/clear_refs").write_text("5")  # the peak counter restarts from the RSS now
before = peak()
export_gguf(model, tokenizer, sys.argv[1], "f16")
print(weights, peak() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak-RSS reset is Linux's /proc")
def test_export_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    """Writing the default model (bf16) as f16 adds less memory than the model's own size:
    the tensors are converted and written one at a time. Making float32 copies of all the
    tensors first (the writer's usual way) adds ~3x the model's size and fails this."""
    out = subprocess.run([sys.executable, "-c", EXPORT_PEAK, str(tmp_path / "model.gguf")], capture_output=True,
                         text=True, check=True)
    weights, growth = map(int, out.stdout.split())
    assert growth < weights, f"export added {growth / 2**20:.0f} MiB to a {weights / 2**20:.0f} MiB model"
