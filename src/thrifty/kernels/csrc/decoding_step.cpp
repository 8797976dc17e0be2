// One decoding step through all decoder layers in one call (decoding_step.py).
//
// A step is ~12 kernel calls per layer. Issued from Python, each paid its binding's
// argument conversion, and the tensor views, splits and adds around them went through
// PyTorch's Python dispatch: a 32-row LoRA step took 36.1 ms that way, 32.3 ms here
// (16 rows: 30.0 -> 26.5). The calls are the same, in the same order on the same
// tensors, so the results are bit for bit those of the modules' forward (tested).
#include "native.h"

#include <cmath>

at::Tensor DecodeLinear::operator()(const at::Tensor& x) const {
  return decode_linear(x, packed, out_features, bias, lora);
}

at::Tensor DecodingLayers::step(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                const c10::optional<at::Tensor>& mask, const std::vector<at::Tensor>& keys,
                                const std::vector<at::Tensor>& values, int64_t length) const {
  TORCH_CHECK(keys.size() == layers.size() && values.size() == layers.size(),
              "decoding step: one key and one value cache per layer");
  const int64_t rows = hidden.size(0), q_width = heads * head_dim, kv_width = kv_heads * head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  at::Tensor x = hidden;
  for (size_t i = 0; i < layers.size(); ++i) {
    const DecodingLayer& layer = layers[i];
    TORCH_CHECK(length < keys[i].size(2), "decoding step: KV cache overflow at position ", length);
    const at::Tensor qkv = layer.qkv(rms_norm_forward(x, layer.input_norm, eps)[0]);
    // [rows, 1, heads, head_dim] views of the fused output as [rows, heads, 1, head_dim].
    auto heads_of = [&](int64_t start, int64_t count) {
      return qkv.narrow(1, start, count * head_dim).view({rows, 1, count, head_dim}).transpose(1, 2);
    };
    const at::Tensor q = rope_forward(heads_of(0, heads), cos, sin);
    keys[i].narrow(2, length, 1).copy_(rope_forward(heads_of(q_width, kv_heads), cos, sin));
    values[i].narrow(2, length, 1).copy_(heads_of(q_width + kv_width, kv_heads));
    const at::Tensor attended =
        decode_attention(q, keys[i].narrow(2, 0, length + 1), values[i].narrow(2, 0, length + 1), mask, scale);
    x = x + layer.o(attended.transpose(1, 2).reshape({rows, q_width}));
    const at::Tensor gate_up = layer.gate_up(rms_norm_forward(x, layer.post_attention_norm, eps)[0]);
    const int64_t width = gate_up.size(1) / 2;
    x = x + layer.down(swiglu_forward(gate_up.narrow(1, 0, width), gate_up.narrow(1, width, width)));
  }
  return x;
}
