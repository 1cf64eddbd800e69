// CUDA kernels of adacomp::select, adacomp::decompress_sum_, adacomp::compress_bucket and
// adacomp::decode_bucket_ (schemas in csrc/adacomp.cpp): argument checks, output and
// workspace allocation through PyTorch's caching allocator, and calls into the torch-free
// cores (select_core.cu, bucket_core.cu) on the current stream.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>

#include <algorithm>
#include <array>
#include <limits>
#include <string>
#include <vector>

#include "../decode.h"
#include "../wire_aten.h"
#include "bucket_core.cuh"
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

// Host bytes [a | b | ...] (each part 8-byte aligned) copied to the device without waiting:
// pinned memory and a non-blocking copy (the caching host allocator keeps the buffer until
// the copy has run). Returns the device buffer; *offsets receives each part's offset.
template <size_t N>
at::Tensor upload(const std::array<std::pair<const void*, size_t>, N>& parts, const at::Device& device,
                  std::array<size_t, N>* offsets) {
  size_t total = 0;
  for (size_t i = 0; i < N; ++i) {
    (*offsets)[i] = total;
    total += (parts[i].second + 7) / 8 * 8;
  }
  auto host = at::empty({(int64_t)std::max<size_t>(total, 8)},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  for (size_t i = 0; i < N; ++i)
    if (parts[i].second) std::memcpy(host.data_ptr<uint8_t>() + (*offsets)[i], parts[i].first, parts[i].second);
  return host.to(device, /*non_blocking=*/true);
}

// One call per bucket (csrc/wire.h): per gradient the selection and phase 1 on the device;
// one copy of the summary rows to the host (the op's only synchronisation, which the size
// exchange needs anyway); then one kernel writes every byte of every payload. Returns data
// on the gradients' device, sizes [max(pieces, 1), T] and info [T, 3] on the host.
std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_bucket_cuda(
    at::TensorList grads, at::TensorList residues, at::TensorList residue_outs, at::IntArrayRef bin_sizes,
    at::IntArrayRef shapes, int64_t pieces, int64_t scale_mode, int64_t value_mode) {
  const int64_t T = (int64_t)grads.size();
  TORCH_CHECK_VALUE(T >= 1, "adacomp::compress_bucket: the CUDA kernel needs at least one gradient");
  TORCH_CHECK_VALUE((int64_t)residues.size() == T && (int64_t)residue_outs.size() == T &&
                        (int64_t)bin_sizes.size() == T,
                    "adacomp::compress_bucket: one residue, residue_out and bin size per gradient");
  TORCH_CHECK_VALUE(pieces >= 0, "adacomp::compress_bucket: pieces must be >= 0, got ", pieces);
  std::vector<std::vector<int64_t>> dims;
  const std::string bad = parse_shapes(shapes.data(), shapes.size(), T, &dims);
  TORCH_CHECK_VALUE(bad.empty(), bad);
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard device_guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t P = pieces > 0 ? pieces : 1;
  const int64_t stride = kSumEdges + P + 1;
  auto table = at::empty({T, stride}, grads[0].options().dtype(at::kLong));
  std::vector<at::Tensor> keep;  // selection results, alive until the write kernel is queued
  std::vector<int64_t> bins(bin_sizes.begin(), bin_sizes.end());
  std::vector<WireTensor> tensors(T);
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& g = grads[t];
    TORCH_CHECK_VALUE(g.device() == device, "adacomp::compress_bucket: gradient ", t, " is on ", g.device(),
                      " and gradient 0 on ", device, "; a bucket lives on one device");
    int64_t numel = 1;
    for (int64_t d : dims[t]) numel *= d;
    TORCH_CHECK_VALUE(numel == g.numel(), "adacomp::compress_bucket: gradient ", t, " has ", g.numel(),
                      " elements, its shape says ", numel);
    auto [counts, offsets, values, scale, info] =
        select_cuda(g, residues[t], const_cast<at::Tensor&>(residue_outs[t]), bins[t], scale_mode, value_mode);
    auto bin_end = at::empty({counts.numel()}, counts.options().dtype(at::kLong));
    auto ws = at::empty({(int64_t)summarize_workspace_bytes(g.numel(), bins[t])}, counts.options().dtype(at::kByte));
    C10_CUDA_CHECK(summarize_launch(g.data_ptr<float>(), g.numel(), bins[t], P, counts.data_ptr<int32_t>(),
                                    info.data_ptr<int64_t>(), scale.data_ptr<float>(), bin_end.data_ptr<int64_t>(),
                                    table.data_ptr<int64_t>() + t * stride, ws.data_ptr(), stream));
    tensors[t] = {bin_end.data_ptr<int64_t>(), offsets.data_ptr<int32_t>(), values.data_ptr<float>()};
    keep.insert(keep.end(), {bin_end, offsets, values});
  }
  const at::Tensor rows = table.cpu();  // the synchronisation
  const WirePlan plan = plan_wire(rows.data_ptr<int64_t>(), stride, dims, bins, pieces, (int)value_mode);
  auto data = at::empty({plan.total}, grads[0].options().dtype(at::kByte));
  if (plan.total) {
    std::array<size_t, 3> at_{};
    const at::Tensor blob = upload<3>({{{plan.pieces.data(), plan.pieces.size() * sizeof(WirePiece)},
                                        {tensors.data(), tensors.size() * sizeof(WireTensor)},
                                        {plan.headers.data(), plan.headers.size()}}},
                                      device, &at_);
    const uint8_t* b = blob.data_ptr<uint8_t>();
    C10_CUDA_CHECK(write_wire_launch(reinterpret_cast<const WirePiece*>(b + at_[0]), (int64_t)plan.pieces.size(),
                                     reinterpret_cast<const WireTensor*>(b + at_[1]), b + at_[2],
                                     data.data_ptr<uint8_t>(), plan.total, stream));
  }
  auto [sizes, info] = bucket_sizes_and_info(plan, rows.data_ptr<int64_t>(), stride, P, T);
  return {data, sizes, info};
}

// Validation on the device (csrc/wire_check.h), one copy of the verdict to the host (the
// op's only synchronisation), then the sums on the device. A rejected bucket is handed to
// the CPU decoder on a host copy, which raises the same ValueError as on the CPU; outs are
// not touched.
void decode_bucket_cuda(at::TensorList outs, at::TensorList rows, at::IntArrayRef entries, int64_t divisor) {
  TORCH_CHECK_VALUE(divisor >= 1, "adacomp::decode_bucket_: divisor must be >= 1, got ", divisor);
  TORCH_CHECK_VALUE(!outs.empty(), "adacomp::decode_bucket_: no outputs");
  const at::Device device = outs[0].device();
  for (const at::Tensor& o : outs)
    TORCH_CHECK_VALUE(o.scalar_type() == at::kFloat && o.is_contiguous() && o.device() == device,
                      "adacomp::decode_bucket_: outputs must be contiguous fp32 tensors on ", device);
  for (const at::Tensor& r : rows)
    TORCH_CHECK_VALUE(r.scalar_type() == at::kByte && r.dim() == 1 && r.is_contiguous() && r.device() == device,
                      "adacomp::decode_bucket_: rows must be contiguous 1-D uint8 tensors on ", device,
                      " (the outputs' device)");
  const CheckPlan plan = check_plan_of(outs, rows, entries);
  const int64_t n = (int64_t)plan.entries.size(), G = (int64_t)plan.groups.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  std::array<size_t, 5> at_{};
  const at::Tensor blob = upload<5>({{{plan.entries.data(), plan.entries.size() * sizeof(CheckEntry)},
                                      {plan.groups.data(), plan.groups.size() * sizeof(CheckGroup)},
                                      {plan.dims.data(), plan.dims.size() * sizeof(int64_t)},
                                      {plan.pos_entry.data(), plan.pos_entry.size() * sizeof(int64_t)},
                                      {plan.pos_base.data(), plan.pos_base.size() * sizeof(int64_t)}}},
                                    device, &at_);
  const uint8_t* b = blob.data_ptr<uint8_t>();
  const auto* es = reinterpret_cast<const CheckEntry*>(b + at_[0]);
  const auto* gs = reinterpret_cast<const CheckGroup*>(b + at_[1]);
  const auto* ds = reinterpret_cast<const int64_t*>(b + at_[2]);
  const auto bytes = outs[0].options().dtype(at::kByte);
  auto parsed = at::empty({n * (int64_t)sizeof(CheckParsed)}, bytes);
  auto zeros = at::empty({plan.total_bytes + 1}, outs[0].options().dtype(at::kLong));
  auto flags = at::empty({1 + G}, outs[0].options().dtype(at::kInt));
  auto ws = at::empty({(int64_t)check_workspace_bytes(plan.total_bytes)}, bytes);
  auto* ps = reinterpret_cast<CheckParsed*>(parsed.data_ptr<uint8_t>());
  C10_CUDA_CHECK(check_bucket_launch(es, n, ds, plan.total_bytes, G, ps, zeros.data_ptr<int64_t>(),
                                     flags.data_ptr<int32_t>(), ws.data_ptr(), stream));
  if (flags[0].item<int32_t>() != 0) {  // the synchronisation
    std::vector<at::Tensor> host_outs, host_rows;
    for (const at::Tensor& t : outs) host_outs.push_back(at::empty_like(t, at::kCPU));
    for (const at::Tensor& t : rows) host_rows.push_back(t.cpu());
    static auto cpu_decode = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("adacomp::decode_bucket_", "")
                                 .typed<void(at::TensorList, at::TensorList, at::IntArrayRef, int64_t)>();
    cpu_decode.call(host_outs, host_rows, entries, divisor);  // raises the CPU decoder's ValueError
    TORCH_CHECK(false, "adacomp::decode_bucket_: the CUDA validation rejected a bucket that the CPU decoder "
                "accepts; this is a bug in adacomp, please report it");
  }
  C10_CUDA_CHECK(apply_bucket_launch(es, n, ps, zeros.data_ptr<int64_t>(), gs, G, plan.total_elems,
                                     flags.data_ptr<int32_t>(), reinterpret_cast<const int64_t*>(b + at_[3]),
                                     reinterpret_cast<const int64_t*>(b + at_[4]), plan.pos_first.data(),
                                     plan.pos_bytes.data(), plan.positions, divisor, stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(adacomp, CUDA, m) {
  m.impl("select", &select_cuda);
  m.impl("decompress_sum_", &decompress_sum_cuda);
  m.impl("compress_bucket", &compress_bucket_cuda);
  m.impl("decode_bucket_", &decode_bucket_cuda);
}

}  // namespace adacomp
