"""Every tensor type the GGUF loader reads, checked against dequantizers written here
from ggml's block layouts (ggml-common.h, dequantize_row_* in ggml-quants.c), not the
`gguf` package the loader uses: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
Q6_K, in a synthetic file whose blocks are random bytes (random scales too). The same
file, a `llama` model with q/k/v biases and a sliding window, also checks that the loader
un-permutes llama's q/k weights and biases and calls it Mistral; llama.cpp itself then
reads the file and gives Thrifty's logits."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from thrifty.formats.gguf import load_gguf

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, FFN = 256, 4, 2, 512  # K-quant rows hold multiples of 256 values
HEAD_DIM = HIDDEN // HEADS
WINDOW = 7

# Block size in values and bytes, and the byte offsets of its float16 scale fields.
BLOCKS = {Q.Q8_0: (32, 34, (0,)), Q.Q4_0: (32, 18, (0,)), Q.Q4_1: (32, 20, (0, 2)), Q.Q5_0: (32, 22, (0,)),
          Q.Q5_1: (32, 24, (0, 2)), Q.Q4_K: (256, 144, (0, 2)), Q.Q5_K: (256, 176, (0, 2)), Q.Q6_K: (256, 210, (208,))}


def f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def nibbles(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (q & 0x0F).astype(np.int32), (q >> 4).astype(np.int32)


def k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: 6-bit scales and mins packed in 12 bytes."""
    s = scales.astype(np.int32)
    sc, mn = np.empty((len(s), 8), np.int32), np.empty((len(s), 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, mn


def dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """One row-major float32 vector from the blocks of `raw` (uint8)."""
    size, nbytes, _ = BLOCKS[qtype]
    b = raw.reshape(-1, nbytes)
    d = f16(b, 208 if qtype == Q.Q6_K else 0)[:, None]
    if qtype == Q.Q8_0:
        return (d * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if qtype in (Q.Q4_0, Q.Q4_1):
        lo, hi = nibbles(b[:, 2 if qtype == Q.Q4_0 else 4:])
        q = np.concatenate([lo, hi], axis=1).astype(np.float32)
        return (d * (q - 8) if qtype == Q.Q4_0 else d * q + f16(b, 2)[:, None]).reshape(-1)
    if qtype in (Q.Q5_0, Q.Q5_1):
        start = 2 if qtype == Q.Q5_0 else 4
        qh = b[:, start:start + 4].copy().view(np.uint32)[:, 0].astype(np.int64)[:, None]
        lo, hi = nibbles(b[:, start + 4:])
        j = np.arange(16)[None, :]
        q = np.concatenate([lo | (((qh >> j) << 4) & 0x10), hi | ((qh >> (j + 12)) & 0x10)], axis=1)
        q = q.astype(np.float32)
        return (d * (q - 16) if qtype == Q.Q5_0 else d * q + f16(b, 2)[:, None]).reshape(-1)
    if qtype in (Q.Q4_K, Q.Q5_K):
        dmin = f16(b, 2)[:, None]
        sc, mn = k_scales(b[:, 4:16])
        qh = b[:, 16:48].astype(np.int32) if qtype == Q.Q5_K else None
        qs = b[:, 48:] if qtype == Q.Q5_K else b[:, 16:]
        out = []
        for chunk in range(4):  # 64 values each: two sub-blocks of 32
            lo, hi = nibbles(qs[:, 32 * chunk:32 * chunk + 32])
            if qh is not None:
                lo = lo + np.where(qh & (1 << (2 * chunk)), 16, 0)
                hi = hi + np.where(qh & (2 << (2 * chunk)), 16, 0)
            for sub, q in ((2 * chunk, lo), (2 * chunk + 1, hi)):
                out.append((d * sc[:, sub:sub + 1]) * q.astype(np.float32) - dmin * mn[:, sub:sub + 1])
        return np.concatenate(out, axis=1).reshape(-1)
    # Q6_K: ql[128], qh[64], scales[16] (int8), d
    ql, qh, scales = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32), b[:, 192:208].view(np.int8)
    y = np.empty((len(b), 256), np.float32)
    for half in range(2):
        l_, h_, s_ = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32], scales[:, 8 * half:8 * half + 8]
        for l in range(32):
            i = l // 16
            q1 = ((l_[:, l] & 0xF) | ((h_[:, l] & 3) << 4)) - 32
            q2 = ((l_[:, l + 32] & 0xF) | (((h_[:, l] >> 2) & 3) << 4)) - 32
            q3 = ((l_[:, l] >> 4) | (((h_[:, l] >> 4) & 3) << 4)) - 32
            q4 = ((l_[:, l + 32] >> 4) | (((h_[:, l] >> 6) & 3) << 4)) - 32
            for k, q in enumerate((q1, q2, q3, q4)):
                y[:, 128 * half + 32 * k + l] = d[:, 0] * s_[:, i + 2 * k].astype(np.float32) * q
    return y.reshape(-1)


def random_blocks(qtype: Q, values: int, rng: np.random.Generator) -> np.ndarray:
    size, nbytes, scale_offsets = BLOCKS[qtype]
    blocks = rng.integers(0, 256, (values // size, nbytes), dtype=np.uint8)
    for offset in scale_offsets:  # finite scales of either sign, as real files hold
        blocks[:, offset:offset + 2] = rng.uniform(-0.05, 0.05, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (rows of q/k weights and biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_file(path: Path) -> dict[str, np.ndarray]:
    """A two-layer llama-architecture model with every block type; returns the HF-named
    float32 tensors it must load as, from this file's own dequantizers."""
    from test_gguf import _vocab  # the tiny byte-level vocabulary of the other synthetic files

    rng = np.random.default_rng(7)
    tokens, types, merges = _vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 2), ("context_length", 64), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV_HEADS)):
        getattr(writer, f"add_{key}")(value)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_sliding_window(WINDOW)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    expected: dict[str, np.ndarray] = {}

    def add(name: str, hf: str, shape: tuple[int, ...], qtype: Q, heads: int = 0) -> None:
        values = int(np.prod(shape))
        if qtype == Q.F32:
            stored = rng.standard_normal(shape).astype(np.float32) * 0.1
            dense = stored
            writer.add_tensor(name, stored)
        elif qtype == Q.F16:
            stored = (rng.standard_normal(shape) * 0.1).astype(np.float16)
            dense = stored.astype(np.float32)
            writer.add_tensor(name, stored)
        elif qtype == Q.BF16:
            bits = (rng.standard_normal(values).astype(np.float32) * 0.1).view(np.uint32) >> 16
            dense = (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
            writer.add_tensor(name, bits.astype(np.uint16).view(np.uint8).reshape(shape[0], -1), raw_dtype=Q.BF16)
        else:
            blocks = random_blocks(qtype, values, rng)
            dense = dequantize(blocks, qtype).reshape(shape)
            writer.add_tensor(name, blocks.reshape(shape[0], -1), raw_dtype=qtype)  # bytes per row
        # The file holds llama's q/k rows permuted; the model must see them un-permuted.
        expected[hf] = unpermute(dense, heads) if heads else dense

    vocab = len(tokens)
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), Q.BF16)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,), Q.F32)
    add("output.weight", "lm_head.weight", (vocab, HIDDEN), Q.Q6_K)
    # Layer by layer: q, k, v, o, gate, up, down (biases stay F32, as llama.cpp adds them).
    layer_types = [(Q.Q4_K, Q.Q5_K, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0),
                   (Q.F16, Q.BF16, Q.Q6_K, Q.Q8_0, Q.Q4_K, Q.F16, Q.Q5_K)]
    for i, (q, k, v, o, gate, up, down) in enumerate(layer_types):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        add(g + "attn_norm.weight", hf + "input_layernorm.weight", (HIDDEN,), Q.F32)
        add(g + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (HIDDEN,), Q.F32)
        add(g + "attn_q.weight", hf + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), q, HEADS)
        add(g + "attn_k.weight", hf + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), k, KV_HEADS)
        add(g + "attn_v.weight", hf + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), v)
        add(g + "attn_q.bias", hf + "self_attn.q_proj.bias", (HEADS * HEAD_DIM,), Q.F32, HEADS)
        add(g + "attn_k.bias", hf + "self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,), Q.F32, KV_HEADS)
        add(g + "attn_v.bias", hf + "self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,), Q.F32)
        add(g + "attn_output.weight", hf + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), o)
        add(g + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (FFN, HIDDEN), gate)
        add(g + "ffn_up.weight", hf + "mlp.up_proj.weight", (FFN, HIDDEN), up)
        add(g + "ffn_down.weight", hf + "mlp.down_proj.weight", (HIDDEN, FFN), down)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def every_type(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf-types") / "every-type.gguf"
    return path, write_file(path)


def test_permutation_helpers_are_inverses() -> None:
    rows = np.arange(HEADS * HEAD_DIM * 3, dtype=np.float32).reshape(HEADS * HEAD_DIM, 3)
    assert np.array_equal(unpermute(permute(rows, HEADS), HEADS), rows)
    assert not np.array_equal(permute(rows, HEADS), rows)


def test_every_block_type_loads_as_the_spec_says(every_type) -> None:  # type: ignore[no-untyped-def]
    path, expected = every_type
    config, weights, _ = load_gguf(path)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert set(types.values()) == {Q.F32, Q.F16, Q.BF16, *BLOCKS}
    assert set(weights) == set(expected)
    for name, want in expected.items():
        # The same float32 formula as ggml, evaluated in another order: a last-bit difference at most.
        np.testing.assert_allclose(weights[name].numpy(), want, rtol=2e-7, atol=1e-9, err_msg=name)
    # llama + a sliding window is how Mistral files present themselves.
    assert config.model_type == "mistral" and config.sliding_window == WINDOW and config.attention_bias


def test_llama_cpp_reads_the_file_as_thrifty_does(every_type) -> None:  # type: ignore[no-untyped-def]
    """llama.cpp's own dequantization and matmuls (its quantized dot products round the
    activations to 8 bits) on the same file: Thrifty's logits within that rounding."""
    from llama_cpp import Llama

    from thrifty.formats.loader import load_model

    path, _ = every_type
    model, tokenizer = load_model(path, dtype="float32", device="cpu")
    ids = tokenizer.encode("the the he t")[:WINDOW]  # inside the window, which llama.cpp's llama ignores
    llm = Llama(model_path=str(path), n_ctx=32, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    # Measured: 4.2% of the largest logit at most (2.7% on average): these random blocks make
    # large activations, which llama.cpp rounds to 8 bits before each quantized dot product.
    # Leaving q's rows permuted instead gives 98% (86%), so the bound tells right from wrong.
    error = (theirs - ours).abs().max() / ours.abs().max()
    assert error < 0.08, float(error)
