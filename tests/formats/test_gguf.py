"""GGUF loading: dequantized tensors and config against transformers' own GGUF loader
on the default model, tiny synthetic llama/qwen2/qwen3 files written with GGUFWriter,
and the errors users see for damaged or unsupported files. Real files, no mocks."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.default_model import DEFAULT_MODEL_NAME, resolve_model_path
from thrifty.formats.gguf import load_gguf
from thrifty.formats.gguf_reader import _FastGGUFReader, metadata_value
from thrifty.formats.gguf_tokenizer import _bytes_to_unicode
from thrifty.model.config import ModelConfig

Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------- the default model


@pytest.fixture(scope="session")
def default_loaded(default_gguf_path: Path):
    return load_gguf(default_gguf_path)


@pytest.fixture(scope="session")
def hf_default_model(request: pytest.FixtureRequest, default_gguf_path: Path):
    """transformers' GGUF loader on the same file (~20 s, so once per session). The model
    parity tests share one in conftest.py (hf_gguf_model); reuse it when it is there."""
    try:
        return request.getfixturevalue("hf_gguf_model")
    except pytest.FixtureLookupError:
        pass
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32)


def test_default_tensors_match_transformers(default_loaded, hf_default_model):
    config, weights, _ = default_loaded
    reference = hf_default_model.state_dict()
    assert config.tie_word_embeddings and "lm_head.weight" not in weights
    assert set(weights) == set(reference) - {"lm_head.weight"}
    for name, w in weights.items():
        ref = reference[name]
        assert w.dtype == torch.float32 and w.shape == ref.shape, name
        # q/k included: equal only if the llama.cpp row permutation is undone.
        # (torch.equal first: assert_close takes ~10 s over these 135M values.)
        assert torch.equal(w, ref) or (w - ref).abs().max().item() <= 1e-6, name


def test_default_config_matches_transformers(default_loaded, hf_default_model):
    config, _, tokenizer = default_loaded
    hf = hf_default_model.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "bos_token_id", "pad_token_id", "model_type"):
        assert getattr(config, field) == getattr(hf, field), field
    assert config.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert config.rope_scaling is None and config.sliding_window is None and not config.qk_norm
    assert config.eos_token_ids == [hf.eos_token_id] == [2]
    assert tokenizer.vocab_size == config.vocab_size == 49152


def test_fast_reader_builds_the_same_fields_as_gguf(default_gguf_path):
    fast, stock = _FastGGUFReader(default_gguf_path), gguf.GGUFReader(default_gguf_path)
    assert list(fast.fields) == list(stock.fields)
    for name, a in fast.fields.items():
        b = stock.fields[name]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types), name
        assert len(a.parts) == len(b.parts), name
        assert all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a.parts, b.parts)), name
    assert [(t.name, t.data_offset, t.n_bytes) for t in fast.tensors] == \
        [(t.name, t.data_offset, t.n_bytes) for t in stock.tensors]
    assert metadata_value(fast, "tokenizer.ggml.tokens") == stock.fields["tokenizer.ggml.tokens"].contents()
    assert metadata_value(fast, "tokenizer.ggml.token_type") == stock.fields["tokenizer.ggml.token_type"].contents()


def test_resolve_model_path(default_gguf_path, tmp_path):
    assert resolve_model_path(None) == default_gguf_path
    assert resolve_model_path(DEFAULT_MODEL_NAME.upper()) == default_gguf_path
    assert default_gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and default_gguf_path.is_file()
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(ThriftyError, match=r"no such file or directory.*\.gguf file, a hub id cached locally.*'smollm2-135m-instruct'"):
        resolve_model_path(str(tmp_path / "nope"))


# ---------------------------------------------------------------- damaged and unsupported files


def test_truncated_file(default_gguf_path, tmp_path):
    for size in (4 << 20, 100_000):  # cut in the tensor data, and in the vocabulary
        cut = tmp_path / f"cut{size}.gguf"
        with open(default_gguf_path, "rb") as f:
            cut.write_bytes(f.read(size))
        with pytest.raises(ThriftyError, match=rf"{cut.name}: the GGUF file is truncated or corrupt; download it again"):
            load_gguf(cut)


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is a text file, not a model\n")
    with pytest.raises(ThriftyError, match=r"model\.gguf: not a GGUF file"):
        load_gguf(fake)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ThriftyError, match=r"empty\.gguf: not a GGUF file"):
        load_gguf(empty)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ThriftyError, match=r"missing\.gguf: no such file"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ThriftyError, match="is a directory"):
        load_gguf(tmp_path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    _write(writer)
    with pytest.raises(ThriftyError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported"):
        load_gguf(path)


# ---------------------------------------------------------------- tiny synthetic files

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = list(_bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    return tokens, types, ["Ġ t", "h e", "Ġt he"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_gguf(path: Path, arch: str, rope_freqs: np.ndarray | None = None,
                    linear_rope: float | None = None, qwen3_head_dim: int = 24) -> dict[str, np.ndarray]:
    """A 2-layer random model in F32/F16/Q8_0; returns the HF-named float32 tensors it should load as.
    Qwen3's heads are wider than hidden/heads, as in the real models (stated by attention.key_length)."""
    rng = np.random.default_rng(0)
    head_dim = qwen3_head_dim if arch == "qwen3" else HIDDEN // HEADS
    tokens, types, merges = _vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if linear_rope:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_rope)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHATML)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype: Q = Q.F32, permute: int = 0) -> None:
        w = rng.standard_normal(shape).astype(np.float32)
        if qtype == Q.F32:
            stored, expected[hf_name] = w, w
        elif qtype == Q.F16:
            stored = w.astype(np.float16)
            expected[hf_name] = stored.astype(np.float32)
        else:
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
            stored = None
        if permute:  # llama.cpp stores llama q/k rows permuted
            w = _permute(w, permute)
            stored = w.astype(stored.dtype) if stored is not None else None
        if stored is None:
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, stored)

    vocab = len(tokens)
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), Q.F16)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    if arch != "qwen2":  # qwen2 ties the output to the embedding
        add("output.weight", "lm_head.weight", (vocab, HIDDEN), Q.Q8_0)
    q_size, kv_size = HEADS * head_dim, KV_HEADS * head_dim
    for i in range(LAYERS):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        llama = arch == "llama"
        add(g + "attn_norm.weight", hf + "input_layernorm.weight", (HIDDEN,))
        add(g + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (HIDDEN,))
        add(g + "attn_q.weight", hf + "self_attn.q_proj.weight", (q_size, HIDDEN), Q.Q8_0, HEADS if llama else 0)
        add(g + "attn_k.weight", hf + "self_attn.k_proj.weight", (kv_size, HIDDEN), Q.F16, KV_HEADS if llama else 0)
        add(g + "attn_v.weight", hf + "self_attn.v_proj.weight", (kv_size, HIDDEN))
        add(g + "attn_output.weight", hf + "self_attn.o_proj.weight", (HIDDEN, q_size), Q.Q8_0)
        add(g + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (FFN, HIDDEN), Q.Q8_0)
        add(g + "ffn_up.weight", hf + "mlp.up_proj.weight", (FFN, HIDDEN))
        add(g + "ffn_down.weight", hf + "mlp.down_proj.weight", (HIDDEN, FFN), Q.Q8_0)
        if arch == "qwen2":
            for p, size in (("q", q_size), ("k", kv_size), ("v", kv_size)):
                add(g + f"attn_{p}.bias", hf + f"self_attn.{p}_proj.bias", (size,))
        if arch == "qwen3":
            add(g + "attn_q_norm.weight", hf + "self_attn.q_norm.weight", (head_dim,))
            add(g + "attn_k_norm.weight", hf + "self_attn.k_norm.weight", (head_dim,))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    _write(writer)
    return expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_loads_with_hf_names_and_flags(arch, tmp_path):
    path = tmp_path / f"tiny-{arch}.gguf"
    expected = write_tiny_gguf(path, arch)
    config, weights, tokenizer = load_gguf(path)
    assert isinstance(config, ModelConfig) and config.model_type == arch
    assert set(weights) == set(expected)
    for name, w in weights.items():
        np.testing.assert_array_equal(w.numpy(), expected[name], err_msg=name)
    assert config.attention_bias == (arch == "qwen2")
    assert config.qk_norm == (arch == "qwen3")
    assert config.tie_word_embeddings == (arch == "qwen2")
    assert config.head_dim == (24 if arch == "qwen3" else 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (HEADS, KV_HEADS, 2)
    assert config.vocab_size == tokenizer.vocab_size == len(_vocab()[0])
    assert config.rope_theta == 1e6 and config.rms_norm_eps == pytest.approx(1e-6)
    # The tokenizer came along: merges, control tokens, chat template, end-of-turn stop id.
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.encode(" the") == [tokenizer.token_to_id("Ġthe")]
    assert tokenizer.encode("<|im_start|>x<|im_end|>")[-1] == im_end
    assert tokenizer.decode(tokenizer.encode("héllo, the wörld!")) == "héllo, the wörld!"
    assert tokenizer.stop_token_ids == [im_end] and config.eos_token_ids == [im_end]
    assert tokenizer.add_bos_token == (arch == "llama")  # llama.cpp adds BOS for llama-bpe
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_matches_transformers(arch, tmp_path):
    import transformers
    path = tmp_path / f"tiny-{arch}.gguf"
    # transformers ignores qwen3.attention.key_length and assumes Qwen3Config's default
    # head_dim of 128 (true of every released Qwen3), so give it that here.
    write_tiny_gguf(path, arch, qwen3_head_dim=128)
    _, weights, tokenizer = load_gguf(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = model.state_dict()
    for name, w in weights.items():
        torch.testing.assert_close(w, reference[name], rtol=0, atol=1e-6, msg=name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ("the cat sat on the mat", " the  the\n\nthe", "<|im_start|>user\nthe<|im_end|>"):
        assert tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


def test_rope_scaling_from_metadata_and_rope_freqs(tmp_path):
    linear = tmp_path / "linear.gguf"
    write_tiny_gguf(linear, "qwen2", linear_rope=4.0)
    assert load_gguf(linear)[0].rope_scaling == {"rope_type": "linear", "factor": 4.0}

    # Llama 3.1's rope_freqs tensor, computed the way convert_hf_to_gguf does.
    theta, dim, factor = 1e6, 16, 8.0
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
    wavelen = 2 * np.pi / freqs
    smooth = (8192 / wavelen - 1) / 3
    factors = np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, factor, 1 / ((1 - smooth) / factor + smooth)))
    llama3 = tmp_path / "llama3.gguf"
    write_tiny_gguf(llama3, "llama", rope_freqs=factors)
    config, weights, _ = load_gguf(llama3)
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert not any("rope_freqs" in n for n in weights)

    odd = tmp_path / "odd.gguf"
    write_tiny_gguf(odd, "llama", rope_freqs=np.linspace(1, 3, dim // 2))
    with pytest.raises(ThriftyError, match="rope_freqs"):
        load_gguf(odd)


def test_incomplete_synthetic_file(tmp_path):
    """A file whose metadata promises more layers than it has tensors for."""
    path = tmp_path / "short.gguf"
    write_tiny_gguf(path, "qwen3")
    reader = gguf.GGUFReader(path)
    assert metadata_value(reader, "qwen3.block_count") == LAYERS
    patched = tmp_path / "patched.gguf"
    shutil.copy(path, patched)
    field = reader.fields["qwen3.block_count"]
    with open(patched, "r+b") as f:  # rewrite block_count in place: 2 -> 3
        f.seek(field.offset + sum(p.nbytes for p in field.parts[:-1]))
        f.write(np.array([3], dtype=field.parts[-1].dtype).tobytes())
    with pytest.raises(ThriftyError, match=r"patched\.gguf: \d+ tensor\(s\) missing.*model\.layers\.2\."):
        load_gguf(patched)
