// Payload body decoding shared by the native decoders (see adacomp/payload.py, which owns
// the format and documents it). Plain C++, no PyTorch: the CUDA decoder reuses it for the
// host-side validation pass.
//
// Body = count stream | entry stream | value stream, each padded to whole bytes.
//   count stream: per bin, its number of sent elements in unary (that many 1-bits, then a
//                 0-bit), LSB-first within bytes; n_bins + n_sent bits.
//   entry stream: per sent element, in flat order, a field of w (+1 sign bit, ternary only)
//                 bits: the bin-local offset in the low w bits, w = ceil(log2(bin_size)).
//   value stream: fp16 or fp32 little-endian values (value kinds fp16/fp32 only).
// Dense kind: the body is numel fp32 values.
#pragma once
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace adacomp {

enum DecodeError {
  kOk = 0,
  kCountStreamOverrun,   // unary counts run past the count stream
  kBinOverfull,          // a bin claims more elements than it has
  kCountMismatch,        // the counts do not add up to n_sent / stream length
  kCountPadding,         // non-zero padding bits in the count stream
  kOffsetOutOfBin,       // an offset lies outside its bin
  kOffsetOrder,          // offsets within a bin not strictly increasing
  kEntryPadding,         // non-zero padding bits in the entry stream
  kValueNotFinite,       // a stored value is NaN/Inf while the non-finite flag is clear
  kLengthMismatch,       // the buffer length differs from what the header implies
};

inline const char* decode_error_message(int code) {
  switch (code) {
    case kCountStreamOverrun: return "count stream ends inside a bin (truncated or corrupt counts)";
    case kBinOverfull: return "a bin claims more sent elements than it holds";
    case kCountMismatch: return "bin counts do not add up to the header's n_sent";
    case kCountPadding: return "non-zero padding bits after the count stream";
    case kOffsetOutOfBin: return "an element offset lies outside its bin";
    case kOffsetOrder: return "element offsets within a bin are not strictly increasing";
    case kEntryPadding: return "non-zero padding bits after the entry stream";
    case kValueNotFinite: return "a stored value is not finite but the non-finite flag is clear";
    case kLengthMismatch: return "payload length differs from the length its header implies";
    default: return "ok";
  }
}

struct BodyLayout {
  int64_t numel, bin_size, n_bins, n_sent;
  int kind;
  int width;       // bits of the offset field
  int field_bits;  // width + sign bit (ternary) or width
  int64_t count_bytes, entry_bytes, value_bytes;
};

ADACOMP_HD int offset_width(int64_t bin_size) {
  int w = 0;
  while (((int64_t)1 << w) < bin_size) ++w;
  return w;
}

// Bits of one entry-stream field: the offset in the bin, and the sign for the ternary kind.
ADACOMP_HD int field_bits(int offset_width, int kind) {
  return offset_width + (kind == kValueTernary ? 1 : 0);
}

// Bytes of the count, entry and value streams of a (non-dense) body: the one definition the
// encoder and the decoders share.
ADACOMP_HD void stream_bytes(int64_t n_bins, int64_t n_sent, int field_bits, int kind, int64_t* count,
                         int64_t* entry, int64_t* value) {
  *count = (n_bins + n_sent + 7) / 8;
  *entry = (n_sent * field_bits + 7) / 8;
  *value = kind == kValueFp16 ? 2 * n_sent : (kind == kValueFp32 ? 4 * n_sent : 0);
}

ADACOMP_HD BodyLayout body_layout(int64_t numel, int64_t bin_size, int64_t n_sent, int kind) {
  BodyLayout l;
  l.numel = numel;
  l.bin_size = bin_size;
  l.n_bins = numel == 0 ? 0 : (numel + bin_size - 1) / bin_size;
  l.n_sent = n_sent;
  l.kind = kind;
  l.width = offset_width(bin_size);
  l.field_bits = field_bits(l.width, kind);
  stream_bytes(l.n_bins, n_sent, l.field_bits, kind, &l.count_bytes, &l.entry_bytes, &l.value_bytes);
  if (kind == kValueDense) {
    l.count_bytes = l.entry_bytes = 0;
    l.value_bytes = 4 * numel;
  }
  return l;
}

// Reads LSB-first bit fields with 64-bit loads; never reads outside its byte range
// (the last bytes are assembled one by one, zero-padded).
struct BitReader {
  const uint8_t* p;
  int64_t nbytes;
  int64_t nbits;
  int64_t pos = 0;
  BitReader(const uint8_t* data, int64_t n) : p(data), nbytes(n), nbits(n * 8) {}
  // 64 bits starting at byte `byte`, zero beyond the end.
  inline uint64_t load64(int64_t byte) const {
    uint64_t v = 0;
    if (byte + 8 <= nbytes) {
      memcpy(&v, p + byte, 8);
    } else {
      for (int64_t i = byte; i < nbytes; ++i) v |= (uint64_t)p[i] << (8 * (i - byte));
    }
    return v;
  }
  inline uint32_t bit() {
    uint32_t b = (p[pos >> 3] >> (pos & 7)) & 1u;
    ++pos;
    return b;
  }
  inline uint64_t bits(int n) {  // n <= 56; the caller checked that they exist
    if (n == 0) return 0;
    const uint64_t v = load64(pos >> 3) >> (pos & 7);
    pos += n;
    return v & ((n == 64) ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1));
  }
  // Number of 1-bits before the next 0-bit, which is consumed; at most `limit` 1-bits may
  // precede it and it must lie inside the stream. Returns -1 otherwise.
  inline int64_t unary(int64_t limit) {
    int64_t c = 0;
    while (true) {
      if (pos >= nbits) return -1;
      const int sh = (int)(pos & 7);
      const uint64_t w = ~(load64(pos >> 3) >> sh);  // zeros of the stream become ones
      const int avail = 64 - sh;                       // bits of this load that are real
      const uint64_t live = avail == 64 ? w : (w & ((((uint64_t)1) << avail) - 1));
      if (live) {
        const int t = __builtin_ctzll(live);
        if (pos + t >= nbits) return -1;  // the 0-bit found is zero padding past the end
        if (c + t > limit) return -1;
        pos += t + 1;
        return c + t;
      }
      c += avail;
      pos += avail;
      if (c > limit) return -1;
    }
  }
};

// Validates one body and calls visit(index, value) for every element it holds, in
// increasing index order (dense kind: every element). Returns a DecodeError code; on an
// error, elements before it may already have been visited, so callers that must not
// change anything on error validate first (with a no-op visitor) or collect first.
template <class Visit>
int visit_body(const uint8_t* body, int64_t body_bytes, const BodyLayout& l, float scale,
               Visit&& visit) {
  if (body_bytes != l.count_bytes + l.entry_bytes + l.value_bytes) return kLengthMismatch;
  if (l.kind == kValueDense) {
    for (int64_t i = 0; i < l.numel; ++i) {
      float v;
      memcpy(&v, body + 4 * i, 4);
      if (!(v - v == 0.0f)) return kValueNotFinite;
      visit(i, v);
    }
    return kOk;
  }
  BitReader counts(body, l.count_bytes);
  BitReader entries(body + l.count_bytes, l.entry_bytes);
  const uint8_t* values = body + l.count_bytes + l.entry_bytes;
  const int64_t count_bits = l.n_bins + l.n_sent;
  const uint64_t mask = l.width ? (((uint64_t)1 << l.width) - 1) : 0;
  int64_t j = 0;
  for (int64_t b = 0; b < l.n_bins; ++b) {
    const int64_t start = b * l.bin_size;
    const int64_t len = (l.numel - start) < l.bin_size ? (l.numel - start) : l.bin_size;
    const int64_t c = counts.unary(count_bits - counts.pos - 1);
    if (c < 0) return kCountStreamOverrun;
    if (c > len) return kBinOverfull;
    if (j + c > l.n_sent) return kCountMismatch;
    int64_t prev = -1;
    for (int64_t t = 0; t < c; ++t, ++j) {
      const uint64_t f = entries.bits(l.field_bits);
      const int64_t o = (int64_t)(f & mask);
      if (o >= len) return kOffsetOutOfBin;
      if (o <= prev) return kOffsetOrder;
      prev = o;
      float v;
      if (l.kind == kValueTernary) {
        // -scale by flipping the sign bit (exact), without a branch on the (random) sign
        v = bits_float(float_bits(scale) ^ ((uint32_t)(f >> l.width) << 31));
      } else if (l.kind == kValueFp16) {
        uint16_t hb;
        memcpy(&hb, values + 2 * j, 2);
        v = half_bits_to_float(hb);
        if (!(v - v == 0.0f)) return kValueNotFinite;
      } else {
        memcpy(&v, values + 4 * j, 4);
        if (!(v - v == 0.0f)) return kValueNotFinite;
      }
      visit(start + o, v);
    }
  }
  if (j != l.n_sent || counts.pos != count_bits) return kCountMismatch;
  while (counts.pos < counts.nbits) {
    if (counts.bit()) return kCountPadding;
  }
  while (entries.pos < entries.nbits) {
    if (entries.bit()) return kEntryPadding;
  }
  return kOk;
}

// Validation only (Apply = false) or validate-and-add into out (Apply = true).
template <bool Apply>
int walk_body(const uint8_t* body, int64_t body_bytes, const BodyLayout& l, float scale,
              float* out) {
  if (Apply) {
    return visit_body(body, body_bytes, l, scale, [out](int64_t i, float v) { out[i] += v; });
  }
  return visit_body(body, body_bytes, l, scale, [](int64_t, float) {});
}

// A validated body as what it adds: the dense kind's values (in the buffer, possibly
// unaligned), or the sent elements' indices and values in increasing index order.
struct DecodedBody {
  const float* dense = nullptr;
  std::vector<int64_t> index;
  std::vector<float> value;
};

// Decoded bodies are applied block by block: each block of an output (kApplyBlock
// elements, L2-sized) receives every body's contributions in order while it is in cache.
constexpr int64_t kApplyBlock = 1 << 16;

// out[i - lo] += what d adds at index i, for lo <= i < hi (d's indices count from out's
// first element at index 0; pass out already offset by lo).
inline void add_block(const DecodedBody& d, float* out, int64_t lo, int64_t hi) {
  if (d.dense) {
    for (int64_t i = lo; i < hi; ++i) {
      float v;
      memcpy(&v, d.dense + i, 4);
      out[i - lo] += v;
    }
    return;
  }
  auto it = std::lower_bound(d.index.begin(), d.index.end(), lo);
  for (size_t j = (size_t)(it - d.index.begin()); j < d.index.size() && d.index[j] < hi; ++j)
    out[d.index[j] - lo] += d.value[j];
}

// Validates one body and collects what it adds into *out; returns a DecodeError code.
inline int decode_body(const uint8_t* body, int64_t body_bytes, const BodyLayout& l, float scale,
                       DecodedBody* out) {
  if (l.kind == kValueDense) {
    out->dense = reinterpret_cast<const float*>(body);
    return walk_body<false>(body, body_bytes, l, scale, nullptr);
  }
  // Written through pointers held by value in the visitor, not push_back (whose size and
  // capacity the compiler reloads after every store): visit_body never visits more than
  // n_sent elements, and on success exactly n_sent (on error the lists are not used).
  out->index.resize(l.n_sent);
  out->value.resize(l.n_sent);
  return visit_body(body, body_bytes, l, scale,
                    [index = out->index.data(), value = out->value.data()](int64_t i, float v) mutable {
                      *index++ = i;
                      *value++ = v;
                    });
}

}  // namespace adacomp
