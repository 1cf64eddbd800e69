// The CUDA bucket ops' algorithm run on the CPU (private ops for the tests):
//
// * adacomp::_compress_bucket_emulated: compress_bucket as the CUDA op computes it: the
//   selection, then phase 1 (bin_end scan, summary_row, the zero check), the host layout
//   (plan_wire) and phase 2 (wire_byte for every output byte), all from csrc/wire.h;
// * adacomp::_decode_bucket_emulated_: decode_bucket_ as the CUDA op computes it: the
//   validation steps and the sums of csrc/wire_check.h, one index after another.
//
// These are the very __host__ __device__ functions that the CUDA kernels (csrc/cuda/
// bucket_core.cu) call once per thread, so tests/test_bucket.py checks the device logic
// against the CPU kernels byte for byte, and fuzzes its validation, without a GPU. Only
// the thread scheduling and the GPU's own arithmetic are left to the GPU tests.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../wire.h"
#include "../wire_aten.h"
#include "kernels.h"

namespace adacomp {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_bucket_emulated(
    at::TensorList grads, at::TensorList residues, at::TensorList residue_outs, at::IntArrayRef bin_sizes,
    at::IntArrayRef shapes, int64_t pieces, int64_t scale_mode, int64_t value_mode) {
  const int64_t T = (int64_t)grads.size();
  TORCH_CHECK_VALUE((int64_t)residues.size() == T && (int64_t)residue_outs.size() == T &&
                        (int64_t)bin_sizes.size() == T && pieces >= 0,
                    "adacomp::_compress_bucket_emulated: bad arguments");
  std::vector<std::vector<int64_t>> dims;
  const std::string bad = parse_shapes(shapes.data(), shapes.size(), T, &dims);
  TORCH_CHECK_VALUE(bad.empty(), bad);
  const int64_t P = pieces > 0 ? pieces : 1;
  const int64_t stride = kSumEdges + P + 1;
  std::vector<int64_t> rows(T * stride);
  std::vector<at::Tensor> keep;
  std::vector<WireTensor> tensors;
  std::vector<int64_t> bins(bin_sizes.begin(), bin_sizes.end());
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& g = grads[t];
    auto [counts, offsets, values, scale, info] =
        select_cpu(g, residues[t], const_cast<at::Tensor&>(residue_outs[t]), bins[t], scale_mode, value_mode);
    const at::Tensor bin_end = counts.to(at::kLong).cumsum(0);
    int64_t* row = rows.data() + t * stride;
    summary_row(bin_end.data_ptr<int64_t>(), info.data_ptr<int64_t>(), scale.data_ptr<float>(), g.numel(), bins[t],
                P, row);
    const float* gp = g.data_ptr<float>();
    bool zero = true;
    for (int64_t i = 0; i < g.numel() && zero; ++i) zero = gp[i] == 0.0f;
    row[kSumZero] = zero;
    tensors.push_back({bin_end.data_ptr<int64_t>(), offsets.data_ptr<int32_t>(), values.data_ptr<float>()});
    keep.insert(keep.end(), {bin_end, offsets, values});
  }
  const WirePlan plan = plan_wire(rows.data(), stride, dims, bins, pieces, (int)value_mode);
  auto data = at::empty({plan.total}, at::kByte);
  uint8_t* out = data.data_ptr<uint8_t>();
  for (int64_t k = 0; k < plan.total; ++k)
    out[k] = wire_byte(plan.pieces.data(), (int64_t)plan.pieces.size(), tensors.data(), plan.headers.data(), k);
  auto [sizes, info] = bucket_sizes_and_info(plan, rows.data(), stride, P, T);
  return {data, sizes, info};
}

void decode_bucket_emulated(at::TensorList outs, at::TensorList rows, at::IntArrayRef entries, int64_t divisor) {
  TORCH_CHECK_VALUE(divisor >= 1, "adacomp::_decode_bucket_emulated_: divisor must be >= 1");
  const CheckPlan plan = check_plan_of(outs, rows, entries);
  const int64_t n = (int64_t)plan.entries.size(), G = (int64_t)plan.groups.size(), B = plan.total_bytes;
  const CheckEntry* es = plan.entries.data();
  std::vector<CheckParsed> parsed(n);
  std::vector<int32_t> flags(1 + G, 0);
  std::vector<int64_t> zeros(B + 1, 0);
  for (int64_t e = 0; e < n; ++e) {  // step 1
    parsed[e] = check_header(es[e].data, es[e].nbytes, plan.dims.data() + es[e].dims_off, es[e].ndim);
    flags[0] |= !parsed[e].ok;
  }
  for (int64_t k = 0; k < B; ++k) {  // step 2
    zeros[k] = byte_zeros(es, n, parsed.data(), k);
    flags[0] |= !check_byte(es, n, parsed.data(), k);
  }
  int64_t run = 0;  // step 3
  for (int64_t k = 0; k <= B; ++k) {
    const int64_t z = k < B ? zeros[k] : 0;
    zeros[k] = run;
    run += z;
  }
  for (int64_t k = 0; k < B; ++k) flags[0] |= !check_count_byte(es, n, parsed.data(), zeros.data(), k);  // 4
  for (int64_t e = 0; e < n; ++e) {  // step 5
    flags[0] |= !check_totals(es[e], parsed[e], zeros.data());
    flags[1 + es[e].group] |= (int32_t)parsed[e].nonfinite;
  }
  TORCH_CHECK_VALUE(!flags[0], "adacomp::_decode_bucket_emulated_: a payload was rejected");
  for (int64_t i = 0; i < plan.total_elems; ++i) fill_elem(plan.groups.data(), G, flags.data(), i);
  for (int64_t p = 0; p < plan.positions; ++p) {
    const int64_t first = plan.pos_first[p], count = plan.pos_first[p + 1] - first;
    for (int64_t k = 0; k < plan.pos_bytes[p]; ++k)
      add_byte(es, parsed.data(), zeros.data(), flags.data(), plan.pos_entry.data() + first,
               plan.pos_base.data() + first, count, k);
  }
  if (divisor > 1)
    for (int64_t i = 0; i < plan.total_elems; ++i)
      divide_elem(plan.groups.data(), G, flags.data(), (float)divisor, i);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adacomp, m) {
  m.def(
      "_compress_bucket_emulated(Tensor[] grads, Tensor[] residues, Tensor(a!)[] residue_outs, int[] bin_sizes, "
      "int[] shapes, int pieces, int scale_mode, int value_mode) -> (Tensor, Tensor, Tensor)");
  m.def("_decode_bucket_emulated_(Tensor(a!)[] outs, Tensor[] rows, int[] entries, int divisor=1) -> ()");
}

TORCH_LIBRARY_IMPL(adacomp, CPU, m) {
  m.impl("_compress_bucket_emulated", &compress_bucket_emulated);
  m.impl("_decode_bucket_emulated_", &decode_bucket_emulated);
}

}  // namespace adacomp
