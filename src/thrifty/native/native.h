// The functions of Thrifty's native module (module.cpp binds them for Python).
//
// Compiled on the user's machine by thrifty/native_kernels.py with -march=native. The
// kernels use AVX-512 with BF16 instructions; on any other CPU they compile to stubs
// and `avx512_bf16()` tells Python to use PyTorch's ops instead.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define THRIFTY_NATIVE_AVX512 1
#else
#define THRIFTY_NATIVE_AVX512 0
#endif

// attention_backward.cpp
std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& out, const at::Tensor& logsumexp,
                                           const c10::optional<at::Tensor>& mask, bool causal,
                                           double scale);
bool brgemm_bf16_available();

// token_log_probs.cpp
std::vector<at::Tensor> token_log_probs(at::Tensor logits, const at::Tensor& targets, double temperature,
                                        const c10::optional<at::Tensor>& grad_scale);
