// The CPU kernels that the per-bucket ops (bucket_kernel.cpp) build on, shared between the
// translation units of csrc/cpu.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace adacomp {

// adacomp::select on CPU (select_kernel.cpp): counts int32[n_bins], offsets int32[n_sent],
// values fp32[n_sent], scale fp32[1], info int64[2] = [n_sent, nonfinite].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_cpu(
    const at::Tensor& grad, const at::Tensor& residue, at::Tensor& residue_out,
    int64_t bin_size, int64_t scale_mode, int64_t value_mode);

// Bytes of a payload body (encode_kernel.cpp) of n_bins bins and n_sent entries.
int64_t body_bytes(int64_t n_bins, int64_t n_sent, int offset_width, int kind);

// Writes that body at `out` (body_bytes(...) bytes); counts must add up to n_sent.
void encode_body_into(uint8_t* out, const int32_t* counts, int64_t n_bins, const int32_t* offsets,
                      const float* values, int64_t n_sent, int offset_width, int kind);

}  // namespace adacomp
