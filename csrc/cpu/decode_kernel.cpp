// CPU kernel of adacomp::decompress_sum_: validates every payload body first, then adds
// them into `out` in list order (so the floating-point sum is the same on every rank and
// every backend). A malformed body raises ValueError before `out` is touched.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../decode.h"

namespace adacomp {
namespace {

constexpr int kMetaPerPayload = 8;

void decompress_sum_cpu(at::Tensor& out, at::TensorList data, at::IntArrayRef meta) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous() && out.device().is_cpu(),
                    "adacomp::decompress_sum_: out must be a contiguous fp32 CPU tensor");
  const int64_t P = (int64_t)data.size();
  TORCH_CHECK_VALUE((int64_t)meta.size() == P * kMetaPerPayload,
                    "adacomp::decompress_sum_: meta must hold ", kMetaPerPayload,
                    " integers per payload");
  float* o = out.data_ptr<float>();
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t p = 0; p < P; ++p) {
      const at::Tensor& t = data[p];
      TORCH_CHECK_VALUE(t.scalar_type() == at::kByte && t.dim() == 1 && t.is_contiguous() &&
                            t.device().is_cpu(),
                        "adacomp::decompress_sum_: payload ", p,
                        " must be a contiguous 1-D uint8 CPU tensor");
      const int64_t* m = meta.data() + p * kMetaPerPayload;
      const int64_t body_offset = m[0], numel = m[1], bin_size = m[2], n_sent = m[3];
      const int kind = (int)m[4];
      const bool nonfinite = m[5] != 0;
      const float scale = bits_float((uint32_t)m[6]);
      TORCH_CHECK_VALUE(numel == out.numel(), "adacomp::decompress_sum_: payload ", p, " holds ",
                        numel, " elements but out has ", out.numel());
      TORCH_CHECK_VALUE(body_offset >= 0 && body_offset <= t.numel() && bin_size >= 1 &&
                            n_sent >= 0 && n_sent <= numel && kind >= 0 && kind <= 3,
                        "adacomp::decompress_sum_: payload ", p, " has an invalid header");
      if (nonfinite) {
        if (pass == 1) out.fill_(NAN);
        continue;
      }
      const BodyLayout l = body_layout(numel, bin_size, n_sent, kind);
      const uint8_t* body = t.data_ptr<uint8_t>() + body_offset;
      const int64_t body_bytes = t.numel() - body_offset;
      const int code = pass == 0 ? walk_body<false>(body, body_bytes, l, scale, nullptr)
                                 : walk_body<true>(body, body_bytes, l, scale, o);
      TORCH_CHECK_VALUE(code == kOk, "adacomp payload ", p, " is malformed: ",
                        decode_error_message(code));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(adacomp, CPU, m) { m.impl("decompress_sum_", &decompress_sum_cpu); }

}  // namespace adacomp
