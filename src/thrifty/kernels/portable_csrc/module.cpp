#include "portable.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_dequantize", &gguf_dequantize, "[rows, in] values of GGUF blocks [rows, bytes], float32 or bfloat16.",
        py::arg("blocks"), py::arg("qtype"), py::arg("in_features"), py::arg("dtype"));
  m.def("gguf_matvec", &gguf_matvec, "x [n, in] @ W^T for W in GGUF blocks [out, bytes], dequantized row by row.",
        py::arg("x"), py::arg("blocks"), py::arg("qtype"));
  m.def("adamw_8bit_step", &adamw_8bit_step,
        "One AdamW step of float32 weights with block-wise 8-bit moments, updated in place.", py::arg("weights"),
        py::arg("grad"), py::arg("state1"), py::arg("state2"), py::arg("absmax1"), py::arg("absmax2"),
        py::arg("code1"), py::arg("code2"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("step"),
        py::arg("lr"), py::arg("weight_decay"));
}
