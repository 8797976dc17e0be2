#include "portable.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_dequantize", &gguf_dequantize, "The values of GGUF blocks [rows, bytes] written into out [rows, in], float32 or "
        "bfloat16.", py::arg("blocks"), py::arg("qtype"), py::arg("out"));
  m.def("gguf_matvec", &gguf_matvec, "x [n, in] @ W^T for W in GGUF blocks [out, bytes], dequantized row by row.",
        py::arg("x"), py::arg("blocks"), py::arg("qtype"));
  m.def("bf16_matvec", &bf16_matvec, "x [n, in] @ W^T in float32 for a few rows n and a bfloat16 weight W [out, in], "
        "rounded once to x's dtype.", py::arg("x"), py::arg("weight"));
  m.def("adamw_8bit_step", &adamw_8bit_step,
        "One AdamW step with block-wise 8-bit moments, in place: float32 weights, or bfloat16 weights with their "
        "bfloat16 low half; float32 or bfloat16 gradients times grad_scale.", py::arg("weights"), py::arg("low"),
        py::arg("grad"), py::arg("grad_scale"), py::arg("state1"), py::arg("state2"), py::arg("absmax1"), py::arg("absmax2"),
        py::arg("code1"), py::arg("code2"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("step"),
        py::arg("lr"), py::arg("weight_decay"));
}
