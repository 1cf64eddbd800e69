// The wire format (version 1, adacomp/payload.py) written from a selection result, shared by
// the CPU kernel (headers), the CUDA bucket op (csrc/cuda/bucket_core.cu) and its host
// emulation (csrc/cpu/wire_emulate.cpp, which runs the very functions the CUDA kernels run,
// on the CPU, so that tests check the device logic byte for byte where no GPU is present).
// Plain C++, no PyTorch.
//
// How the CUDA op compresses a bucket (docs/algorithm.md section 6), in two phases around
// the one host synchronisation that the size exchange needs anyway:
//
//   phase 1, on the device, per gradient: the selection (select_launch), bin_end = inclusive
//     scan of the per-bin counts, and a summary row (summary_row): n_sent, nonfinite, the
//     all-zero flag, the scale's bits and the number of entries before each shard edge;
//   the host reads the summary rows (one copy, the synchronisation), builds every piece's
//     header with encode_header and lays the pieces out piece-major (plan_wire);
//   phase 2, on the device: one thread per output byte (wire_byte) gathers that byte from
//     the header, the count stream, the entry stream or the value stream of its piece. Every
//     byte is written exactly once: no zeroing, no atomics, no read-modify-write.
#pragma once
#include <math.h>
#include <stdint.h>

#include <string>
#include <vector>

#include "common.h"
#include "decode.h"

namespace adacomp {

constexpr uint8_t kWireVersion = 1;
constexpr int kWireMaxNdim = 32;
// Summary row of one gradient: these fields, then the entries before each of pieces + 1
// shard edges.
constexpr int kSumSent = 0, kSumNonfinite = 1, kSumZero = 2, kSumScaleBits = 3, kSumEdges = 4;

// Edge s (0 <= s <= pieces) of adacomp.payload.shard_bounds(numel, bin_size, pieces): pieces
// ranges on bin boundaries.
ADACOMP_HD int64_t shard_edge(int64_t numel, int64_t bin_size, int64_t pieces, int64_t s) {
  if (s >= pieces) return numel;
  const int64_t L = numel ? (bin_size < numel ? (bin_size > 1 ? bin_size : 1) : numel) : 1;
  const int64_t nb = numel ? (numel + L - 1) / L : 0;
  const int64_t e = (s * nb / pieces) * L;
  return e < numel ? e : numel;
}

// Phase 1's summary of one gradient's selection. bin_end: inclusive scan of the counts
// (n_bins entries); sel_info: select's {n_sent, nonfinite}; scale: select's scale. pieces >=
// 1. Leaves row[kSumZero] alone (the zero check writes it).
ADACOMP_HD void summary_row(const int64_t* bin_end, const int64_t* sel_info, const float* scale,
                            int64_t numel, int64_t bin_size, int64_t pieces, int64_t* row) {
  row[kSumSent] = sel_info[0];
  row[kSumNonfinite] = sel_info[1];
  row[kSumScaleBits] = (int64_t)float_bits(scale[0]);
  const int64_t L = bin_size;
  for (int64_t s = 0; s <= pieces; ++s) {
    const int64_t b = (shard_edge(numel, L, pieces, s) + L - 1) / L;  // first bin of piece s
    row[kSumEdges + s] = b == 0 ? 0 : bin_end[b - 1];
  }
}

// One piece (payload) of the bucket's output, as the byte-writing kernel sees it.
struct WirePiece {
  int64_t out_off;      // first byte in the output buffer
  int64_t header_off;   // first byte of its header in the header blob
  int64_t header_len;
  int64_t count_bytes, entry_bytes, value_bytes;  // 0, 0, 0 for a non-finite piece
  int64_t b0, b1;       // bins of the gradient's selection it holds
  int64_t e0, e1;       // entries (sent elements) it holds
  int32_t width;        // bits of the offset field
  int32_t fbits;        // bits of one entry field
  int32_t kind;         // kValueTernary, kValueFp16 or kValueFp32
  int32_t tensor;       // index into the WireTensor array
};

// One gradient's selection result in (device) memory.
struct WireTensor {
  const int64_t* bin_end;  // inclusive scan of the per-bin counts
  const int32_t* offsets;  // bin-local offset of each sent element, flat order
  const float* values;     // Q of each sent element
};

// The count stream byte kb of piece p: per bin, its count in 1-bits then a 0-bit (the bin's
// terminator), LSB first; padding bits are 0.
ADACOMP_HD uint8_t count_stream_byte(const WirePiece& p, const WireTensor& t, int64_t kb) {
  const int64_t nbits = (p.b1 - p.b0) + (p.e1 - p.e0);
  const int64_t lo = 8 * kb;
  uint32_t byte = 0;
  for (int i = 0; i < 8 && lo + i < nbits; ++i) byte |= 1u << i;
  // The terminator of bin b sits at (b - b0) + (entries up to and including b) - e0, which
  // grows with b: the first one at or after lo, by bisection.
  int64_t a = p.b0, z = p.b1;
  while (a < z) {
    const int64_t m = a + (z - a) / 2;
    if ((m - p.b0) + (t.bin_end[m] - p.e0) < lo) a = m + 1; else z = m;
  }
  for (int64_t b = a; b < p.b1; ++b) {
    const int64_t term = (b - p.b0) + (t.bin_end[b] - p.e0);
    if (term >= lo + 8) break;
    byte &= ~(1u << (term - lo));
  }
  return (uint8_t)byte;
}

// The entry stream byte kb of piece p: per sent element, its bin-local offset in the low
// width bits (and, ternary, its sign above them), fbits bits each, LSB first.
ADACOMP_HD uint8_t entry_stream_byte(const WirePiece& p, const WireTensor& t, int64_t kb) {
  const int64_t lo = 8 * kb;
  const int64_t n = p.e1 - p.e0;
  int64_t j = lo / p.fbits;
  uint64_t byte = 0;
  for (; j < n; ++j) {
    const int64_t at = j * p.fbits;
    if (at >= lo + 8) break;
    uint64_t field = (uint32_t)t.offsets[p.e0 + j];
    if (p.kind == kValueTernary) field |= (uint64_t)(t.values[p.e0 + j] < 0.0f) << p.width;
    byte |= at >= lo ? field << (at - lo) : field >> (lo - at);
  }
  return (uint8_t)(byte & 0xFFu);
}

// The value stream byte kb of piece p: fp16 or fp32 little-endian values.
ADACOMP_HD uint8_t value_stream_byte(const WirePiece& p, const WireTensor& t, int64_t kb) {
  if (p.kind == kValueFp16) {
    const uint32_t h = float_to_half_bits(t.values[p.e0 + kb / 2]);
    return (uint8_t)(h >> (8 * (kb & 1)));
  }
  return (uint8_t)(float_bits(t.values[p.e0 + kb / 4]) >> (8 * (kb & 3)));
}

// Byte k of the bucket's output: pieces sorted by out_off (empty pieces allowed), headers the
// header blob.
ADACOMP_HD uint8_t wire_byte(const WirePiece* pieces, int64_t n_pieces, const WireTensor* tensors,
                             const uint8_t* headers, int64_t k) {
  const WirePiece& p = pieces[last_start_at_or_before(n_pieces, k, [pieces](int64_t m) { return pieces[m].out_off; })];
  int64_t pos = k - p.out_off;
  if (pos < p.header_len) return headers[p.header_off + pos];
  pos -= p.header_len;
  const WireTensor& t = tensors[p.tensor];
  if (pos < p.count_bytes) return count_stream_byte(p, t, pos);
  pos -= p.count_bytes;
  if (pos < p.entry_bytes) return entry_stream_byte(p, t, pos);
  return value_stream_byte(p, t, pos - p.entry_bytes);
}

// ------------------------------------------------------------------ host side

inline void put_varint(std::vector<uint8_t>& out, uint64_t v) {
  while (true) {
    const uint8_t byte = v & 0x7F;
    v >>= 7;
    if (v) {
      out.push_back(byte | 0x80);
    } else {
      out.push_back(byte);
      return;
    }
  }
}

// adacomp.payload.encode_header, appended to h.
inline void encode_header(std::vector<uint8_t>& h, const int64_t* shape, int ndim, int64_t bin_size,
                          int64_t n_sent, int kind, bool nonfinite, float scale) {
  const uint8_t fixed[5] = {'A', 'C', kWireVersion, (uint8_t)((nonfinite ? 1 : 0) | (kind << 1)),
                            (uint8_t)ndim};
  h.insert(h.end(), fixed, fixed + 5);
  for (int i = 0; i < ndim; ++i) put_varint(h, (uint64_t)shape[i]);
  put_varint(h, (uint64_t)bin_size);
  put_varint(h, (uint64_t)n_sent);
  if (kind == kValueTernary) {
    const uint32_t bits = float_bits(scale);
    for (int i = 0; i < 4; ++i) h.push_back((uint8_t)(bits >> (8 * i)));
  }
}

// compress_bucket's shapes argument (per gradient its ndim, then its sizes) as T size lists;
// returns "" or what is wrong with it.
inline std::string parse_shapes(const int64_t* shapes, size_t size, int64_t T,
                                std::vector<std::vector<int64_t>>* dims) {
  size_t sp = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (!(sp < size && shapes[sp] >= 0 && shapes[sp] <= kWireMaxNdim && sp + 1 + shapes[sp] <= size))
      return "adacomp::compress_bucket: shapes must hold ndim then the sizes, per gradient";
    dims->emplace_back(shapes + sp + 1, shapes + sp + 1 + shapes[sp]);
    sp += 1 + shapes[sp];
  }
  return "";
}

// Phase 2's layout from phase 1's summary rows (T rows of `stride` int64): every piece
// (piece-major: piece s of every gradient, then piece s + 1), the header blob, the size
// table [max(pieces, 1), T] and the total. dims: per gradient its sizes; bins: its (clamped)
// bin size; pieces = 0: one payload of the gradient's shape per gradient.
struct WirePlan {
  std::vector<WirePiece> pieces;
  std::vector<uint8_t> headers;
  std::vector<int64_t> sizes;
  int64_t total = 0;
};

inline WirePlan plan_wire(const int64_t* rows, int64_t stride, const std::vector<std::vector<int64_t>>& dims,
                          const std::vector<int64_t>& bins, int64_t pieces, int kind) {
  const int64_t T = (int64_t)dims.size();
  const bool split = pieces > 0;
  const int64_t P = split ? pieces : 1;
  WirePlan plan;
  plan.sizes.resize(P * T);
  plan.pieces.reserve(P * T);
  for (int64_t s = 0; s < P; ++s) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t* row = rows + t * stride;
      const bool bad = row[kSumNonfinite] != 0;
      const float scale = bits_float((uint32_t)row[kSumScaleBits]);
      int64_t numel = 1;
      for (int64_t d : dims[t]) numel *= d;
      const int64_t L = bins[t];
      WirePiece p{};
      p.kind = kind;
      p.tensor = (int32_t)t;
      p.header_off = (int64_t)plan.headers.size();
      const int64_t start = shard_edge(numel, L, P, s), end = shard_edge(numel, L, P, s + 1);
      p.b0 = (start + L - 1) / L;
      p.b1 = (end + L - 1) / L;
      p.e0 = bad ? 0 : row[kSumEdges + s];
      p.e1 = bad ? 0 : row[kSumEdges + s + 1];
      const int64_t sent = p.e1 - p.e0;
      int64_t piece_bin = L;
      if (split) {
        const int64_t len = end - start;
        piece_bin = len < L ? (len > 1 ? len : 1) : L;
        encode_header(plan.headers, &len, 1, piece_bin, sent, kind, bad, bad ? NAN : scale);
      } else {
        encode_header(plan.headers, dims[t].data(), (int)dims[t].size(), L, sent, kind, bad,
                      bad ? NAN : scale);
      }
      p.header_len = (int64_t)plan.headers.size() - p.header_off;
      p.width = offset_width(piece_bin);
      p.fbits = field_bits(p.width, kind);
      if (!bad) stream_bytes(p.b1 - p.b0, sent, p.fbits, kind, &p.count_bytes, &p.entry_bytes, &p.value_bytes);
      p.out_off = plan.total;
      const int64_t size = p.header_len + p.count_bytes + p.entry_bytes + p.value_bytes;
      plan.sizes[s * T + t] = size;
      plan.total += size;
      plan.pieces.push_back(p);
    }
  }
  return plan;
}

}  // namespace adacomp
