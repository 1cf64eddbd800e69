// PyTorch glue shared by the CUDA bucket ops (csrc/cuda/kernels_binding.cu) and their CPU
// emulation (csrc/cpu/wire_emulate.cpp).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

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

}  // namespace adacomp
