// CPU kernel of adacomp::decompress_sum_: validates every payload body first, then adds
// them into `out`. A malformed body raises ValueError before `out` is touched.
//
// Each payload is decoded (and validated) into a sorted list of (index, value). The lists
// are then applied block by block: for each block of `out` (L2-sized), payload 0's
// entries in it, then payload 1's, and so on. Every element therefore receives its
// contributions in list order, the same floating-point sum as adding whole payloads one
// after another (and as every other backend), while each cache line of `out` is
// fetched once per block instead of once per payload, and blocks run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../decode.h"

namespace adacomp {
namespace {

constexpr int kMetaPerPayload = 8;

struct Decoded : DecodedBody {
  bool nonfinite = false;
};

void decompress_sum_cpu(at::Tensor& out, at::TensorList data, at::IntArrayRef meta) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous() && out.device().is_cpu(),
                    "adacomp::decompress_sum_: out must be a contiguous fp32 CPU tensor");
  const int64_t P = (int64_t)data.size();
  TORCH_CHECK_VALUE((int64_t)meta.size() == P * kMetaPerPayload,
                    "adacomp::decompress_sum_: meta must hold ", kMetaPerPayload,
                    " integers per payload");
  const int64_t n = out.numel();
  std::vector<Decoded> dec(P);
  bool any_nonfinite = false;
  for (int64_t p = 0; p < P; ++p) {
    const at::Tensor& t = data[p];
    TORCH_CHECK_VALUE(t.scalar_type() == at::kByte && t.dim() == 1 && t.is_contiguous() &&
                          t.device().is_cpu(),
                      "adacomp::decompress_sum_: payload ", p,
                      " must be a contiguous 1-D uint8 CPU tensor");
    const int64_t* m = meta.data() + p * kMetaPerPayload;
    const int64_t body_offset = m[0], numel = m[1], bin_size = m[2], n_sent = m[3];
    const int kind = (int)m[4];
    const float scale = bits_float((uint32_t)m[6]);
    TORCH_CHECK_VALUE(numel == n, "adacomp::decompress_sum_: payload ", p, " holds ", numel,
                      " elements but out has ", n);
    TORCH_CHECK_VALUE(body_offset >= 0 && body_offset <= t.numel() && bin_size >= 1 &&
                          n_sent >= 0 && n_sent <= numel && kind >= 0 && kind <= 3,
                      "adacomp::decompress_sum_: payload ", p, " has an invalid header");
    if (m[5] != 0) {
      dec[p].nonfinite = any_nonfinite = true;
      continue;
    }
    const BodyLayout l = body_layout(numel, bin_size, n_sent, kind);
    const uint8_t* body = t.data_ptr<uint8_t>() + body_offset;
    const int64_t body_bytes = t.numel() - body_offset;
    const int code = decode_body(body, body_bytes, l, scale, &dec[p]);
    TORCH_CHECK_VALUE(code == kOk, "adacomp payload ", p, " is malformed: ",
                      decode_error_message(code));
  }
  if (any_nonfinite) {  // a NaN/Inf gradient anywhere makes the whole sum non-finite
    out.fill_(NAN);
    return;
  }
  float* o = out.data_ptr<float>();
  const int64_t n_blocks = (n + kApplyBlock - 1) / kApplyBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t lo = k * kApplyBlock, hi = std::min(n, lo + kApplyBlock);
      for (const Decoded& d : dec) add_block(d, o + lo, lo, hi);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(adacomp, CPU, m) { m.impl("decompress_sum_", &decompress_sum_cpu); }

}  // namespace adacomp
