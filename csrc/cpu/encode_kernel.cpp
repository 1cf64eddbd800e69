// CPU kernel of adacomp::encode_body: the body of a payload (docs/algorithm.md section 3,
// wire format version 1) from one selection result, in one pass over the compacted
// selection: the unary count stream, the offset+sign entry stream, then the value stream.
// Byte for byte what adacomp.payload.encode builds from PyTorch ops (the reference).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

#include "../decode.h"
#include "kernels.h"

namespace adacomp {
int64_t body_bytes(int64_t n_bins, int64_t n_sent, int offset_width, int kind) {
  int64_t count, entry, value;
  stream_bytes(n_bins, n_sent, field_bits(offset_width, kind), kind, &count, &entry, &value);
  return count + entry + value;
}

void encode_body_into(uint8_t* p, const int32_t* cnt, int64_t nb, const int32_t* off, const float* val,
                      int64_t k, int offset_width, int kind) {
  const int fbits = field_bits(offset_width, kind);
  int64_t count_bytes, entry_bytes, value_bytes;
  stream_bytes(nb, k, fbits, kind, &count_bytes, &entry_bytes, &value_bytes);
  std::memset(p, 0, count_bytes + entry_bytes);  // SegmentWriter ORs its edge bytes in
  SegmentWriter w;
  w.begin(p, 0);
  for (int64_t b = 0; b < nb; ++b) w.unary(cnt[b]);
  w.end();
  w.begin(p + count_bytes, 0);
  for (int64_t i = 0; i < k; ++i) {
    uint64_t field = static_cast<uint32_t>(off[i]);
    if (kind == kValueTernary && val[i] < 0.0f) field |= (1ull << offset_width);
    w.put(field, fbits);
  }
  w.end();
  uint8_t* vp = p + count_bytes + entry_bytes;
  if (kind == kValueFp16) {
    for (int64_t i = 0; i < k; ++i) {
      const uint16_t h = c10::Half(val[i]).x;
      std::memcpy(vp + 2 * i, &h, 2);
    }
  } else if (kind == kValueFp32 && k) {
    std::memcpy(vp, val, 4 * k);
  }
}

namespace {

at::Tensor encode_body_cpu(const at::Tensor& counts, const at::Tensor& offsets, const at::Tensor& values,
                           int64_t offset_width, int64_t kind) {
  TORCH_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kInt, "encode_body: counts must be 1-D int32");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kInt, "encode_body: offsets must be 1-D int32");
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kFloat, "encode_body: values must be 1-D fp32");
  TORCH_CHECK(offsets.numel() == values.numel(), "encode_body: one value per offset");
  TORCH_CHECK(kind == kValueTernary || kind == kValueFp16 || kind == kValueFp32,
              "encode_body: kind must be 0, 1 or 2");
  TORCH_CHECK(offset_width >= 0 && offset_width <= 31, "encode_body: offset_width must be in [0, 31]");
  auto c = counts.contiguous();
  auto o = offsets.contiguous();
  auto v = values.contiguous();
  const int64_t nb = c.numel(), k = o.numel();
  const int32_t* cnt = c.data_ptr<int32_t>();
  int64_t total = 0;
  for (int64_t b = 0; b < nb; ++b) {
    TORCH_CHECK(cnt[b] >= 0, "encode_body: negative count");
    total += cnt[b];
  }
  TORCH_CHECK(total == k, "encode_body: counts sum to ", total, " but there are ", k, " offsets");
  auto out = at::empty({body_bytes(nb, k, (int)offset_width, (int)kind)}, c.options().dtype(at::kByte));
  encode_body_into(out.data_ptr<uint8_t>(), cnt, nb, o.data_ptr<int32_t>(), v.data_ptr<float>(), k,
                   (int)offset_width, (int)kind);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adacomp, CPU, m) { m.impl("encode_body", &encode_body_cpu); }

}  // namespace adacomp
