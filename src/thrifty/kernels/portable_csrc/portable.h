// The kernels of the portable module (plain C++ that g++ vectorizes for any x86 CPU).
#pragma once
#include <torch/extension.h>

void gguf_dequantize(const at::Tensor& blocks, int64_t qtype, at::Tensor& out);
at::Tensor gguf_matvec(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype);
at::Tensor bf16_matvec(const at::Tensor& x, const at::Tensor& weight);
void adamw_8bit_step(at::Tensor& weights, const c10::optional<at::Tensor>& low, const at::Tensor& grad,
                     double grad_scale, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
                     at::Tensor& absmax2, const at::Tensor& code1, const at::Tensor& code2, double beta1,
                     double beta2, double eps, int64_t step, double lr, double weight_decay);
