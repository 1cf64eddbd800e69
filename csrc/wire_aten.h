// PyTorch glue shared by the CUDA bucket ops (csrc/cuda/kernels_binding.cu) and their CPU
// emulation (csrc/cpu/wire_emulate.cpp).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "wire.h"
#include "wire_check.h"

namespace adacomp {

// plan_check over tensors (outputs read flat, rows as bytes); raises its message as a
// ValueError.
inline CheckPlan check_plan_of(at::TensorList outs, at::TensorList rows, at::IntArrayRef entries) {
  std::vector<std::pair<float*, int64_t>> o;
  std::vector<std::pair<const uint8_t*, int64_t>> r;
  for (const at::Tensor& t : outs) o.emplace_back(t.data_ptr<float>(), t.numel());
  for (const at::Tensor& t : rows) r.emplace_back(t.data_ptr<uint8_t>(), t.numel());
  CheckPlan plan;
  const std::string bad = plan_check(entries.data(), entries.size(), o, r, &plan);
  TORCH_CHECK_VALUE(bad.empty(), bad);
  return plan;
}

// compress_bucket's sizes [P, T] and info [T, 3] = [n_sent, nonfinite, all-zero] (host
// tensors) from its layout and phase 1's summary rows (T rows of `stride`).
inline std::pair<at::Tensor, at::Tensor> bucket_sizes_and_info(const WirePlan& plan, const int64_t* rows,
                                                               int64_t stride, int64_t P, int64_t T) {
  auto sizes = at::tensor(at::ArrayRef<int64_t>(plan.sizes), at::kLong).reshape({P, T});
  auto info = at::empty({T, 3}, at::kLong);
  int64_t* inf = info.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    inf[3 * t] = rows[t * stride + kSumSent];
    inf[3 * t + 1] = rows[t * stride + kSumNonfinite];
    inf[3 * t + 2] = rows[t * stride + kSumZero];
  }
  return {sizes, info};
}

}  // namespace adacomp
