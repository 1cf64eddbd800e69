// Validation and decoding of a bucket's received payloads as data-parallel steps, for the
// CUDA decode_bucket_ (csrc/cuda/bucket_core.cu) and its host emulation
// (csrc/cpu/wire_emulate.cpp, which runs these very functions on the CPU so that tests can
// fuzz them against the CPU decoder without a GPU). Plain C++, no PyTorch.
//
// A payload is accepted here exactly when adacomp.payload.parse_header and the sequential
// walker of decode.h (visit_body) accept it; only the error message is not produced (the
// CUDA op asks the CPU decoder for it, on a host copy, once something is rejected). The
// steps, each a pure function of one index:
//
//   1. check_header (one per payload): parse_header's checks, into a CheckParsed;
//   2. byte_zeros + check_byte (one per byte of all payloads): the 0-bits of each count
//      stream byte (bin terminators, for the scan), non-zero padding bits, non-finite
//      stored values;
//   3. an exclusive scan of byte_zeros over all bytes (zeros_before);
//   4. check_count_byte (one per byte): every 1-bit of a count stream is a sent element in
//      bin (0-bits before it); its offset must lie in that bin, and be larger than the
//      previous element's when the previous bit is a 1-bit too (same bin). Distinct
//      offsets inside a bin also bound its count by its length (no overfull bin);
//   5. check_totals (one per payload): exactly n_bins 0-bits among the count_bits stream
//      bits and the last of them a 0-bit, so the counts add up to n_sent and the stream
//      ends where the header says.
// Decoding then adds, per count byte, each element's value at bin * bin_size + offset
// (add_count_byte), or each dense value (add_dense_value).
#pragma once
#include <stdint.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "decode.h"

namespace adacomp {

constexpr int kCheckMaxNdim = 32;
constexpr int kCheckMaxVarint = 9;
constexpr int64_t kCheckMaxNumel = (int64_t)1 << 48;
constexpr int64_t kCheckMaxBin = ((int64_t)1 << 31) - 1;

// One received payload (host-filled).
struct CheckEntry {
  const uint8_t* data;  // its first byte
  int64_t nbytes;
  int64_t byte_base;    // its first byte in the bucket's byte space (payloads concatenated)
  int64_t dims_off;     // its expected shape: dims[dims_off .. dims_off + ndim)
  int64_t ndim;
  float* out;           // the first element of its output range
  int64_t group;        // its output range's index (payloads of one range are summed)
  int64_t position;     // its place in that sum (0, 1, ...)
};

// What check_header found (device-filled).
struct CheckParsed {
  int64_t ok;
  int64_t nonfinite;
  int64_t kind;
  int64_t numel, bin_size, n_sent, n_bins;
  int64_t header_bytes, count_bytes, entry_bytes, value_bytes;
  int64_t width, fbits;
  float scale;
};

// One output range (host-filled).
struct CheckGroup {
  float* out;
  int64_t numel;
  int64_t elem_base;  // its first element in the space of all ranges
};

ADACOMP_HD bool finite_f32(float v) { return v - v == 0.0f; }

// adacomp.payload.parse_header's checks for payload e (whose bytes are data[0, nbytes)),
// expecting shape dims[0, ndim).
ADACOMP_HD CheckParsed check_header(const uint8_t* buf, int64_t total_len, const int64_t* dims,
                                    int64_t ndim_expected) {
  CheckParsed h{};
  const int64_t cap = 5 + (kCheckMaxNdim + 2) * kCheckMaxVarint + 4;
  const int64_t n = total_len < cap ? total_len : cap;
  if (n < 5 || buf[0] != 'A' || buf[1] != 'C' || buf[2] != 1 || (buf[3] & ~0x07)) return h;
  h.nonfinite = buf[3] & 1;
  h.kind = (buf[3] >> 1) & 3;
  const int ndim = buf[4];
  if (ndim > kCheckMaxNdim) return h;
  int64_t pos = 5;
  bool bad = false;
  auto varint = [&]() -> uint64_t {
    uint64_t v = 0;
    for (int i = 0; i < kCheckMaxVarint; ++i) {
      if (pos + i >= n) break;
      const uint8_t byte = buf[pos + i];
      v |= (uint64_t)(byte & 0x7F) << (7 * i);
      if (!(byte & 0x80)) {
        if (byte == 0 && i > 0) break;
        pos += i + 1;
        return v;
      }
    }
    bad = true;
    return 0;
  };
  // Each size is compared as it is read (no array: the check is one register-only thread
  // on the GPU); every condition is still the parser's, so the same payloads pass.
  if (ndim != ndim_expected) return h;
  uint64_t numel = 1;
  bool huge = false, zero = false;
  for (int i = 0; i < ndim && !bad; ++i) {
    const uint64_t d = varint();
    if (bad || d != (uint64_t)dims[i]) return h;
    if (zero) continue;
    if (d == 0) {
      numel = 0;
      huge = false;
      zero = true;
      continue;
    }
    if (!huge && numel > (uint64_t)kCheckMaxNumel / d) huge = true;
    if (!huge) numel *= d;
  }
  const uint64_t bin_size = bad ? 0 : varint();
  const uint64_t n_sent = bad ? 0 : varint();
  if (bad || huge || numel > (uint64_t)kCheckMaxNumel) return h;
  const uint64_t most = numel > 1 ? numel : 1;
  if (bin_size < 1 || bin_size > most || bin_size > (uint64_t)kCheckMaxBin) return h;
  if (n_sent > numel) return h;
  if ((h.nonfinite || h.kind == kValueDense) && n_sent != 0) return h;
  if (h.kind == kValueTernary) {
    if (pos + 4 > n) return h;
    uint32_t bits = 0;
    for (int i = 0; i < 4; ++i) bits |= (uint32_t)buf[pos + i] << (8 * i);
    h.scale = bits_float(bits);
    pos += 4;
    if (!h.nonfinite && n_sent && !(finite_f32(h.scale) && h.scale > 0)) return h;
  }
  h.numel = (int64_t)numel;
  h.bin_size = (int64_t)bin_size;
  h.n_sent = (int64_t)n_sent;
  h.header_bytes = pos;
  const BodyLayout l = body_layout(h.numel, h.bin_size, h.n_sent, (int)h.kind);
  h.n_bins = l.n_bins;
  h.width = l.width;
  h.fbits = l.field_bits;
  if (!h.nonfinite) {
    h.count_bytes = l.count_bytes;
    h.entry_bytes = l.entry_bytes;
    h.value_bytes = l.value_bytes;
  }
  if (total_len != pos + h.count_bytes + h.entry_bytes + h.value_bytes) return h;
  h.ok = 1;
  return h;
}

// The payload holding byte k of the bucket's byte space (entries sorted by byte_base).
ADACOMP_HD int64_t entry_of_byte(const CheckEntry* es, int64_t n, int64_t k) {
  return last_start_at_or_before(n, k, [es](int64_t m) { return es[m].byte_base; });
}

// Where byte `pos` of a payload lies: 0 header, 1 count stream, 2 entry stream, 3 values;
// *at receives its position inside that part.
ADACOMP_HD int part_of(const CheckParsed& h, int64_t pos, int64_t* at) {
  if (pos < h.header_bytes) return *at = pos, 0;
  pos -= h.header_bytes;
  if (pos < h.count_bytes) return *at = pos, 1;
  pos -= h.count_bytes;
  if (pos < h.entry_bytes) return *at = pos, 2;
  return *at = pos - h.entry_bytes, 3;
}

ADACOMP_HD int64_t count_bits_of(const CheckParsed& h) { return h.n_bins + h.n_sent; }

// 0-bits among the stream bits (not padding) of count stream byte i.
ADACOMP_HD int zeros_in_byte(uint8_t byte, int64_t nbits, int64_t i) {
  const int64_t rest = nbits - 8 * i;
  const int valid = rest < 8 ? (int)rest : 8;
  int z = 0;
  for (int b = 0; b < valid; ++b) z += !((byte >> b) & 1u);
  return z;
}

// Step 2 for byte k: its 0-bit count for the scan (count streams only, else 0).
ADACOMP_HD int64_t byte_zeros(const CheckEntry* es, int64_t n, const CheckParsed* ps, int64_t k) {
  const int64_t e = entry_of_byte(es, n, k);
  const CheckParsed& h = ps[e];
  int64_t at;
  if (!h.ok || h.nonfinite || h.kind == kValueDense || part_of(h, k - es[e].byte_base, &at) != 1) return 0;
  return zeros_in_byte(es[e].data[k - es[e].byte_base], count_bits_of(h), at);
}

// Step 2 for byte k: false if it holds a non-zero padding bit or starts a stored value that
// is not finite.
ADACOMP_HD bool check_byte(const CheckEntry* es, int64_t n, const CheckParsed* ps, int64_t k) {
  const int64_t e = entry_of_byte(es, n, k);
  const CheckParsed& h = ps[e];
  if (!h.ok || h.nonfinite) return true;
  const uint8_t* p = es[e].data + (k - es[e].byte_base);
  int64_t at;
  const int part = part_of(h, k - es[e].byte_base, &at);
  if (part == 1 || part == 2) {
    const int64_t bits = part == 1 ? count_bits_of(h) : h.n_sent * h.fbits;
    const int64_t rest = bits - 8 * at;
    if (rest >= 8) return true;
    const uint32_t pad = rest <= 0 ? 0xFFu : (0xFFu & ~((1u << rest) - 1u));
    return (*p & pad) == 0;
  }
  if (part == 3) {
    if (h.kind == kValueFp16) {
      if (at & 1) return true;
      return finite_f32(half_bits_to_float((uint16_t)(p[0] | (p[1] << 8))));
    }
    if (at & 3) return true;  // fp32 and dense values
    const uint32_t u = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    return finite_f32(bits_float(u));
  }
  return true;
}

// LSB-first field of nbits (<= 32) at bitpos of a stream of nbytes; zero beyond it.
ADACOMP_HD uint64_t stream_field(const uint8_t* p, int64_t nbytes, int64_t bitpos, int nbits) {
  if (nbits == 0) return 0;
  const int64_t first = bitpos >> 3;
  const int shift = (int)(bitpos & 7);
  const int need = (shift + nbits + 7) >> 3;
  uint64_t acc = 0;
  for (int t = 0; t < need; ++t)
    if (first + t < nbytes) acc |= (uint64_t)p[first + t] << (8 * t);
  return (acc >> shift) & ((1ull << nbits) - 1ull);
}

// Calls f(bin, j, offset) for every 1-bit (sent element j, in bin) of count stream byte k
// (a byte of a valid header's count stream, zeros_before its exclusive 0-bit scan); returns
// false as soon as an element is not in a bin, not before the stream's n_sent, or outside
// its bin, or (with `order`) not after its bin's previous element.
template <bool order, class F>
ADACOMP_HD bool visit_count_byte(const CheckEntry& e, const CheckParsed& h, int64_t zeros_before_entry,
                                 const int64_t* zeros_before, int64_t k, F&& f) {
  const int64_t at = k - e.byte_base - h.header_bytes;  // byte of the count stream
  const uint8_t* count = e.data + h.header_bytes;
  const uint8_t* entry = count + h.count_bytes;
  const int64_t nbits = count_bits_of(h);
  const uint64_t mask = h.width ? ((1ull << h.width) - 1ull) : 0ull;
  int64_t bin = zeros_before[k] - zeros_before_entry;
  const uint32_t byte = count[at];
  for (int i = 0; i < 8; ++i) {
    const int64_t pos = 8 * at + i;
    if (pos >= nbits) break;
    if (!((byte >> i) & 1u)) {
      ++bin;
      continue;
    }
    const int64_t j = pos - bin;
    if (bin >= h.n_bins || j >= h.n_sent) return false;
    const int64_t start = bin * h.bin_size;
    const int64_t len = h.numel - start < h.bin_size ? h.numel - start : h.bin_size;
    const int64_t o = (int64_t)(stream_field(entry, h.entry_bytes, j * h.fbits, (int)h.fbits) & mask);
    if (o >= len) return false;
    if (order && pos > 0) {
      const bool prev_one = i > 0 ? ((byte >> (i - 1)) & 1u) : ((count[at - 1] >> 7) & 1u);
      if (prev_one) {
        const int64_t prev = (int64_t)(stream_field(entry, h.entry_bytes, (j - 1) * h.fbits, (int)h.fbits) & mask);
        if (prev >= o) return false;
      }
    }
    f(bin, j, o);
  }
  return true;
}

// Whether byte k is a count stream byte of a valid, finite, sparse payload (and which).
ADACOMP_HD bool is_count_byte(const CheckEntry* es, int64_t n, const CheckParsed* ps, int64_t k, int64_t* e_out) {
  const int64_t e = entry_of_byte(es, n, k);
  const CheckParsed& h = ps[e];
  *e_out = e;
  int64_t at;
  return h.ok && !h.nonfinite && h.kind != kValueDense && part_of(h, k - es[e].byte_base, &at) == 1;
}

// Step 4 for byte k.
ADACOMP_HD bool check_count_byte(const CheckEntry* es, int64_t n, const CheckParsed* ps,
                                 const int64_t* zeros_before, int64_t k) {
  int64_t e;
  if (!is_count_byte(es, n, ps, k, &e)) return true;
  const int64_t first = es[e].byte_base + ps[e].header_bytes;
  return visit_count_byte<true>(es[e], ps[e], zeros_before[first], zeros_before, k,
                                [](int64_t, int64_t, int64_t) {});
}

// Step 5 for payload e (zeros_before holds total_bytes + 1 entries).
ADACOMP_HD bool check_totals(const CheckEntry& e, const CheckParsed& h, const int64_t* zeros_before) {
  if (!h.ok) return false;
  if (h.nonfinite || h.kind == kValueDense || h.count_bytes == 0) return true;
  const int64_t first = e.byte_base + h.header_bytes;
  if (zeros_before[first + h.count_bytes] - zeros_before[first] != h.n_bins) return false;
  const int64_t last = count_bits_of(h) - 1;
  return !((e.data[h.header_bytes + (last >> 3)] >> (last & 7)) & 1u);
}

// The value of sent element j of a valid payload (ternary: the sign bit above the offset).
ADACOMP_HD float element_value(const CheckEntry& e, const CheckParsed& h, int64_t j) {
  const uint8_t* entry = e.data + h.header_bytes + h.count_bytes;
  const uint8_t* values = entry + h.entry_bytes;
  if (h.kind == kValueTernary) {
    const uint64_t f = stream_field(entry, h.entry_bytes, j * h.fbits, (int)h.fbits);
    return bits_float(float_bits(h.scale) ^ ((uint32_t)(f >> h.width) << 31));
  }
  if (h.kind == kValueFp16) return half_bits_to_float((uint16_t)(values[2 * j] | (values[2 * j + 1] << 8)));
  const uint8_t* p = values + 4 * j;
  return bits_float((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24));
}

// The output range holding element i of the space of all ranges (groups sorted by elem_base).
ADACOMP_HD int64_t group_of(const CheckGroup* gs, int64_t n, int64_t i) {
  return last_start_at_or_before(n, i, [gs](int64_t m) { return gs[m].elem_base; });
}

// Before the sums: element i is 0, or NaN (the CPU decoder's quiet NaN) in a range that holds
// a non-finite payload (flags[1 + group]).
ADACOMP_HD void fill_elem(const CheckGroup* gs, int64_t n_groups, const int32_t* flags, int64_t i) {
  const int64_t g = group_of(gs, n_groups, i);
  gs[g].out[i - gs[g].elem_base] = flags[1 + g] ? bits_float(0x7FC00000u) : 0.0f;
}

// Adds what byte k of the payloads at one position (of their ranges' sums) contributes:
// each element of a count stream byte, or the dense value starting at k. Those payloads
// are pos_entry[0, count), their bytes concatenated (pos_base: where each starts), so one
// pass per position covers only its own payloads.
ADACOMP_HD void add_byte(const CheckEntry* es, const CheckParsed* parsed, const int64_t* zeros_before,
                         const int32_t* flags, const int64_t* pos_entry, const int64_t* pos_base, int64_t count,
                         int64_t k) {
  const int64_t a = last_start_at_or_before(count, k, [pos_base](int64_t m) { return pos_base[m]; });
  const int64_t e = pos_entry[a];
  k = es[e].byte_base + (k - pos_base[a]);  // the byte in the bucket's byte space
  const CheckEntry& ce = es[e];
  const CheckParsed& h = parsed[e];
  if (flags[1 + ce.group] || h.nonfinite) return;
  int64_t at;
  const int part = part_of(h, k - ce.byte_base, &at);
  if (h.kind == kValueDense) {
    if (part == 3 && (at & 3) == 0) {
      const uint8_t* p = ce.data + (k - ce.byte_base);
      ce.out[at / 4] += bits_float((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
                                   ((uint32_t)p[3] << 24));
    }
  } else if (part == 1) {
    const int64_t first = ce.byte_base + h.header_bytes;
    visit_count_byte<false>(ce, h, zeros_before[first], zeros_before, k, [&](int64_t bin, int64_t j, int64_t o) {
      ce.out[bin * h.bin_size + o] += element_value(ce, h, j);
    });
  }
}

// After the sums: element i divided by d (IEEE division, as Tensor.div_ on the CPU), except
// in a non-finite range, whose NaN stays as written.
ADACOMP_HD void divide_elem(const CheckGroup* gs, int64_t n_groups, const int32_t* flags, float d, int64_t i) {
  const int64_t g = group_of(gs, n_groups, i);
  if (!flags[1 + g]) gs[g].out[i - gs[g].elem_base] /= d;
}

// ------------------------------------------------------------------ host side

// A bucket's decode, laid out for the steps above from decode_bucket_'s entry table (per
// payload [out, start, end, row, byte offset, nbytes, ndim, sizes...]). outs: each output's
// first element and numel; rows: each row's first byte and length.
struct CheckPlan {
  std::vector<CheckEntry> entries;
  std::vector<CheckGroup> groups;
  std::vector<int64_t> dims;
  int64_t total_bytes = 0, total_elems = 0, positions = 0;
  // The payloads at each position, position after position: pos_entry[pos_first[p],
  // pos_first[p + 1]) are position p's, pos_base their byte offsets in p's own byte space of
  // pos_bytes[p] bytes.
  std::vector<int64_t> pos_entry, pos_base, pos_first, pos_bytes;
};

// Returns "" and fills *plan, or the message of the first problem with the table (the
// messages of the CPU decode_bucket_).
inline std::string plan_check(const int64_t* table, size_t size, const std::vector<std::pair<float*, int64_t>>& outs,
                              const std::vector<std::pair<const uint8_t*, int64_t>>& rows, CheckPlan* plan) {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> ranges;  // (out, start, end) per group
  for (size_t i = 0; i < size;) {
    if (!(i + 7 <= size && table[i + 6] >= 0 && i + 7 + table[i + 6] <= size))
      return "adacomp::decode_bucket_: malformed entry table";
    const int64_t out = table[i], start = table[i + 1], end = table[i + 2], row = table[i + 3];
    const int64_t offset = table[i + 4], nbytes = table[i + 5], nd = table[i + 6];
    uint64_t numel = 1;
    CheckEntry e{};
    e.dims_off = (int64_t)plan->dims.size();
    e.ndim = nd;
    for (int64_t d = 0; d < nd; ++d) {
      plan->dims.push_back(table[i + 7 + d]);
      numel *= (uint64_t)table[i + 7 + d];
    }
    i += 7 + nd;
    if (!(out >= 0 && out < (int64_t)outs.size() && row >= 0 && row < (int64_t)rows.size()))
      return "adacomp::decode_bucket_: entry names an output or row that does not exist";
    if (!(0 <= start && start <= end && end <= outs[out].second && (uint64_t)(end - start) == numel))
      return "adacomp::decode_bucket_: entry range does not match its output or shape";
    // (no offset + nbytes: a corrupt size table could make the sum wrap around)
    if (!(offset >= 0 && nbytes >= 0 && offset <= rows[row].second && nbytes <= rows[row].second - offset))
      return "adacomp::decode_bucket_: entry bytes lie outside their row";
    const bool same = !ranges.empty() && std::get<0>(ranges.back()) == out &&
                      std::get<1>(ranges.back()) == start && std::get<2>(ranges.back()) == end;
    if (!same) {
      ranges.emplace_back(out, start, end);
      plan->groups.push_back({outs[out].first + start, end - start, plan->total_elems});
      plan->total_elems += end - start;
    }
    e.data = rows[row].first + offset;
    e.nbytes = nbytes;
    e.byte_base = plan->total_bytes;
    e.out = outs[out].first + start;
    e.group = (int64_t)plan->groups.size() - 1;
    e.position = same ? plan->entries.back().position + 1 : 0;
    plan->positions = std::max(plan->positions, e.position + 1);
    plan->total_bytes += nbytes;
    plan->entries.push_back(e);
  }
  for (int64_t p = 0; p < plan->positions; ++p) {
    plan->pos_first.push_back((int64_t)plan->pos_entry.size());
    int64_t bytes = 0;
    for (size_t i = 0; i < plan->entries.size(); ++i) {
      if (plan->entries[i].position != p) continue;
      plan->pos_entry.push_back((int64_t)i);
      plan->pos_base.push_back(bytes);
      bytes += plan->entries[i].nbytes;
    }
    plan->pos_bytes.push_back(bytes);
  }
  plan->pos_first.push_back((int64_t)plan->pos_entry.size());
  std::sort(ranges.begin(), ranges.end());
  for (size_t g = 1; g < ranges.size(); ++g)
    if (std::get<0>(ranges[g]) == std::get<0>(ranges[g - 1]) && std::get<1>(ranges[g]) < std::get<2>(ranges[g - 1]))
      return "adacomp::decode_bucket_: output ranges overlap";
  return "";
}

}  // namespace adacomp
