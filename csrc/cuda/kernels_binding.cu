// CUDA kernels of adacomp::select and adacomp::decompress_sum_ (schemas in csrc/adacomp.cpp):
// argument checks, output and workspace allocation through PyTorch's caching allocator,
// and a call into the torch-free core (select_core.cu) on the current stream.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../decode.h"
#include "select_core.cuh"

namespace adacomp {
namespace {

constexpr int kMetaPerPayload = 8;
constexpr int64_t kMaxBinSize = std::numeric_limits<int32_t>::max();  // int32 offsets

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_cuda(
    const at::Tensor& grad, const at::Tensor& residue, at::Tensor& residue_out,
    int64_t bin_size, int64_t scale_mode, int64_t value_mode) {
  TORCH_CHECK_VALUE(bin_size >= 1 && bin_size <= kMaxBinSize,
                    "adacomp::select: bin_size must be between 1 and ", kMaxBinSize, ", got ",
                    bin_size);
  TORCH_CHECK_VALUE(scale_mode == kScaleBinmaxMean || scale_mode == kScaleSelectedMean,
                    "adacomp::select: unknown scale_mode ", scale_mode);
  TORCH_CHECK_VALUE(value_mode >= kValueTernary && value_mode <= kValueFp32,
                    "adacomp::select: unknown value_mode ", value_mode);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&grad, &residue, &residue_out}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, "adacomp::select: expected fp32 tensors, got ",
                      t->scalar_type(), " (convert with .float())");
    TORCH_CHECK_VALUE(t->is_contiguous(), "adacomp::select: tensors must be contiguous");
    TORCH_CHECK_VALUE(t->device() == grad.device(), "adacomp::select: grad is on ", grad.device(),
                      " but another argument is on ", t->device(), "; move them to one device");
  }
  TORCH_CHECK_VALUE(grad.is_cuda(), "adacomp::select: CUDA kernel got a ", grad.device(), " tensor");
  const int64_t n = grad.numel();
  TORCH_CHECK_VALUE(residue.numel() == n && residue_out.numel() == n, "adacomp::select: grad has ",
                    n, " elements but residue has ", residue.numel(), " and residue_out ",
                    residue_out.numel());
  // residue_out is written while grad (and residue) are still being read.
  TORCH_CHECK_VALUE(at::get_overlap_status(residue_out, grad) == at::MemOverlapStatus::No,
                    "adacomp::select: residue_out must not share memory with grad");
  const auto alias = at::get_overlap_status(residue_out, residue);
  TORCH_CHECK_VALUE(alias == at::MemOverlapStatus::No || alias == at::MemOverlapStatus::Full,
                    "adacomp::select: residue_out may be residue itself but must not partly "
                    "overlap it");

  const c10::cuda::CUDAGuard device_guard(grad.device());
  const int64_t n_bins = n == 0 ? 0 : (n + bin_size - 1) / bin_size;
  const auto opts = grad.options();
  // Capacity-sized outputs: the number of sent elements stays on the device (info[0]), so
  // the op never waits for the GPU; callers slice offsets/values with it.
  auto counts = at::empty({n_bins}, opts.dtype(at::kInt));
  auto offsets = at::empty({n}, opts.dtype(at::kInt));
  auto values = at::empty({n}, opts);
  auto scale = at::empty({1}, opts);
  auto info = at::empty({2}, opts.dtype(at::kLong));
  auto workspace =
      at::empty({(int64_t)select_workspace_bytes(n, bin_size)}, opts.dtype(at::kByte));
  C10_CUDA_CHECK(select_launch(grad.data_ptr<float>(), residue.data_ptr<float>(),
                               residue_out.data_ptr<float>(), n, bin_size, (int)scale_mode,
                               (int)value_mode, counts.data_ptr<int32_t>(),
                               offsets.data_ptr<int32_t>(), values.data_ptr<float>(),
                               scale.data_ptr<float>(), info.data_ptr<int64_t>(),
                               workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return {counts, offsets, values, scale, info};
}

// Validation runs on a host copy of each payload with the same walker as the CPU decoder
// (so the same payloads are rejected with the same messages, before out is touched); the
// decoding and the additions run on the device. Copying the payloads to the host makes this
// op synchronise, which is acceptable on the receive path.
void decompress_sum_cuda(at::Tensor& out, at::TensorList data, at::IntArrayRef meta) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous() && out.is_cuda(),
                    "adacomp::decompress_sum_: out must be a contiguous fp32 CUDA tensor");
  const int64_t P = (int64_t)data.size();
  TORCH_CHECK_VALUE((int64_t)meta.size() == P * kMetaPerPayload,
                    "adacomp::decompress_sum_: meta must hold ", kMetaPerPayload,
                    " integers per payload");
  const c10::cuda::CUDAGuard device_guard(out.device());
  std::vector<DeviceBody> bodies;
  bodies.reserve(P);
  bool any_nonfinite = false;
  for (int64_t p = 0; p < P; ++p) {
    const at::Tensor& t = data[p];
    TORCH_CHECK_VALUE(t.scalar_type() == at::kByte && t.dim() == 1 && t.is_contiguous(),
                      "adacomp::decompress_sum_: payload ", p,
                      " must be a contiguous 1-D uint8 tensor");
    TORCH_CHECK_VALUE(t.device() == out.device(), "adacomp::decompress_sum_: payload ", p, " is on ",
                      t.device(), " but out is on ", out.device(), "; move it with .to(out.device)");
    const int64_t* m = meta.data() + p * kMetaPerPayload;
    const int64_t body_offset = m[0], numel = m[1], bin_size = m[2], n_sent = m[3];
    const int kind = (int)m[4];
    const bool nonfinite = m[5] != 0;
    const float scale = bits_float((uint32_t)m[6]);
    TORCH_CHECK_VALUE(numel == out.numel(), "adacomp::decompress_sum_: payload ", p, " holds ",
                      numel, " elements but out has ", out.numel());
    TORCH_CHECK_VALUE(body_offset >= 0 && body_offset <= t.numel() && bin_size >= 1 &&
                          bin_size <= kMaxBinSize && n_sent >= 0 && n_sent <= numel &&
                          kind >= kValueTernary && kind <= kValueDense,
                      "adacomp::decompress_sum_: payload ", p, " has an invalid header");
    if (nonfinite) {
      any_nonfinite = true;
      continue;
    }
    const BodyLayout l = body_layout(numel, bin_size, n_sent, kind);
    const at::Tensor host = t.cpu();
    const int code = walk_body<false>(host.data_ptr<uint8_t>() + body_offset,
                                      t.numel() - body_offset, l, scale, nullptr);
    TORCH_CHECK_VALUE(code == kOk, "adacomp payload ", p, " is malformed: ",
                      decode_error_message(code));
    bodies.push_back({t.data_ptr<uint8_t>() + body_offset, numel, bin_size, n_sent, kind, scale});
  }
  if (any_nonfinite) {
    // A non-finite payload makes the whole sum NaN (NaN + x is NaN), as on the CPU, where
    // the quiet NaN written in its place survives every later addition bit for bit.
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const size_t ws_bytes = decompress_workspace_bytes(bodies.data(), (int64_t)bodies.size());
  auto workspace = at::empty({(int64_t)ws_bytes}, out.options().dtype(at::kByte));
  C10_CUDA_CHECK(decompress_sum_launch(out.data_ptr<float>(), bodies.data(),
                                       (int64_t)bodies.size(),
                                       ws_bytes ? workspace.data_ptr() : nullptr,
                                       c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(adacomp, CUDA, m) {
  m.impl("select", &select_cuda);
  m.impl("decompress_sum_", &decompress_sum_cuda);
}

}  // namespace adacomp
