// Python bindings of the native kernels; see native.h.
#include <torch/extension.h>

#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("avx512_bf16", [] { return THRIFTY_NATIVE_AVX512 == 1; },
        "Whether the kernels were compiled for this CPU (else they are stubs).");
  m.def("attention_uses_amx", &attention_uses_amx, "Whether the attention matmuls run on AMX (else AVX-512 BF16).");
  m.def("attention_backward", &attention_backward,
        "Gradients of softmax attention from its output and logsumexp (attention_backward.cpp).");
  m.def("attention_forward", &attention_forward,
        "Softmax attention's output and logsumexp over the visible key blocks (attention_forward.cpp).");
  m.def("token_log_probs", &token_log_probs,
        "log p(target) per row of a logits chunk; with grad_scale, the chunk becomes d/d logits.");
  m.def("rms_norm_forward", &rms_norm_forward, "(weight * bf16(x * rstd), rstd) per row.");
  m.def("rms_norm_backward", &rms_norm_backward, "d loss / d x of rms_norm_forward.");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up, rounded as PyTorch's two bf16 ops.");
  m.def("swiglu_backward", &swiglu_backward, "(d loss / d gate, d loss / d up).");
  m.def("rope_forward", &rope_forward, "x * cos + rotate_half(x) * sin, [B, H, T, D] contiguous.");
  m.def("rope_backward", &rope_backward, "d loss / d x of rope_forward, from the output's gradient.");
  m.def("decode_linear_pack", &decode_linear_pack, "A bf16 [out, in] weight in decode_linear's blocked layout.");
  m.def("decode_lora_pack", &decode_lora_pack,
        "A group's LoRA branches (float A^T [in, sum(ranks)], block-diagonal scaled B^T [sum(ranks), sum(sizes)]) "
        "as decode_linear's `lora` operands.",
        py::arg("a_t"), py::arg("bt"), py::arg("ranks"), py::arg("sizes"));
  m.def("decode_linear", &decode_linear,
        "x @ W^T (+ bias) (+ (x @ A^T) @ B^T) for a few rows, W and the LoRA branch packed by decode_*_pack.",
        py::arg("x"), py::arg("packed"), py::arg("out_features"), py::arg("bias"),
        py::arg("lora") = std::vector<at::Tensor>());
  m.def("decode_linear_uses_amx", &decode_linear_uses_amx,
        "Whether decode_linear runs on AMX tiles (else AVX-512 BF16).");
  m.def("decode_attention", &decode_attention, "Softmax attention of one query per row over its keys.");
  m.def("decode_attention_supports", &decode_attention_supports, "Whether decode_attention takes this head_dim.");
  py::class_<DecodeLinear>(m, "DecodeLinear", "A fused group of linear layers as decode_linear takes it.")
      .def(py::init<at::Tensor, int64_t, c10::optional<at::Tensor>, std::vector<at::Tensor>>(), py::arg("packed"),
           py::arg("out_features"), py::arg("bias"), py::arg("lora"))
      .def("__call__", &DecodeLinear::operator(), "decode_linear of x [rows, in] with these operands.", py::arg("x"));
  py::class_<DecodingLayer>(m, "DecodingLayer", "One decoder layer's weights for decoding steps.")
      .def(py::init<at::Tensor, at::Tensor, DecodeLinear, DecodeLinear, DecodeLinear, DecodeLinear>(),
           py::arg("input_norm"), py::arg("post_attention_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"));
  py::class_<DecodingLayers>(m, "DecodingLayers", "All decoder layers of a model for decoding steps.")
      .def(py::init<std::vector<DecodingLayer>, int64_t, int64_t, int64_t, double>(), py::arg("layers"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"))
      .def("step", &DecodingLayers::step, "Hidden states after the last layer; writes the step's keys and values.",
           py::arg("hidden"), py::arg("cos"), py::arg("sin"), py::arg("mask"), py::arg("keys"), py::arg("values"),
           py::arg("length"));
  m.def("sample_tokens", &sample_tokens, "One token per row from softmax(logits / temperature), inverse CDF.");
}
