// CPU kernels of the per-bucket ops (docs/algorithm.md section 6, "one call per bucket"):
//
// * adacomp::compress_bucket: selection, residue update and the whole payload (header and
//   body, wire format version 1, adacomp/payload.py) of every tensor of a bucket, written
//   into one contiguous byte buffer, with the size table the size exchange sends;
// * adacomp::decode_bucket_: parse and validate every received payload of a bucket (header
//   and body, with the error messages of adacomp.payload.parse_header and of
//   decompress_sum_), then zero and sum them into their output ranges. Nothing is written
//   unless every payload is valid.
//
// Both are byte for byte (and bit for bit) what the per-tensor Python path builds from
// AdaComp.prepare / prepare_split and Payload.from_tensor + decompress_sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../decode.h"
#include "../wire.h"
#include "../wire_aten.h"
#include "kernels.h"

namespace adacomp {
namespace {

constexpr int kMaxNdim = 32;
constexpr int kMaxVarintBytes = 9;
constexpr int64_t kMaxNumel = (int64_t)1 << 48;
constexpr int64_t kMaxBinSize = ((int64_t)1 << 31) - 1;

// ----------------------------------------------------------------------------- encoding

struct Piece {
  std::vector<uint8_t> header;
  int64_t b0 = 0, b1 = 0, e0 = 0, e1 = 0;  // bins and entries of the selection it holds
  int width = 0;
  int64_t size = 0;
  uint8_t* body = nullptr;  // where its body goes in the output
  int64_t count_bytes = 0, entry_bytes = 0, value_bytes = 0;
};

// Writes chunk c's share of a gradient's payload bodies (whose bit streams are zeroed): the
// bits of its bins in the unary count stream, its entries' offset(+sign) fields and their
// values, each at the position that the bins and entries before it fix, with Q and R = G - Q
// on the way (finish_range). A chunk may straddle the boundary of two shard pieces; it then
// writes a segment of each.
void encode_chunk(const SelectPass& s, const std::vector<Piece>& ps, int kind, int64_t c) {
  const int64_t b_end = std::min(s.nb, (c + 1) * s.bins_per_chunk);
  int64_t b = c * s.bins_per_chunk;
  int64_t e = s.start[c];
  size_t pi = 0;
  SegmentWriter w;
  while (b < b_end) {
    while (pi + 1 < ps.size() && ps[pi].b1 <= b) ++pi;
    const Piece& p = ps[pi];
    const int64_t seg_end = std::min(b_end, p.b1);
    const int64_t e0 = e;
    // Count stream: per bin, its count in ones and a zero.
    w.begin(p.body, (b - p.b0) + (e - p.e0));
    for (; b < seg_end; ++b) {
      const int32_t n = s.cnt[b];
      w.unary(n);
      e += n;
    }
    w.end();
    const int fbits = field_bits(p.width, kind);
    w.begin(p.body + p.count_bytes, (e0 - p.e0) * fbits);
    uint8_t* values = p.body + p.count_bytes + p.entry_bytes;
    const int64_t first = p.e0;
    const int width = p.width;
    if (kind == kValueTernary) {
      finish_range(s, c, e0, e, [&](int64_t, int32_t offset, float q) {
        w.put((uint64_t)(uint32_t)offset | ((uint64_t)(q < 0.0f) << width), fbits);
      });
    } else if (kind == kValueFp16) {
      finish_range(s, c, e0, e, [&](int64_t j, int32_t offset, float q) {
        w.put((uint32_t)offset, fbits);
        const uint16_t h = c10::Half(q).x;
        std::memcpy(values + 2 * (j - first), &h, 2);
      });
    } else {
      finish_range(s, c, e0, e, [&](int64_t j, int32_t offset, float q) {
        w.put((uint32_t)offset, fbits);
        std::memcpy(values + 4 * (j - first), &q, 4);
      });
    }
    w.end();
  }
}

// Returns (data uint8, sizes int64[pieces, T], info int64[T, 3] = n_sent, nonfinite, zero).
// Every gradient's streaming pass runs first (it fixes the sizes); the output is then
// allocated and each gradient's sent elements are finished straight into their payloads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_bucket_cpu(
    at::TensorList grads, at::TensorList residues, at::TensorList residue_outs, at::IntArrayRef bin_sizes,
    at::IntArrayRef shapes, int64_t pieces, int64_t scale_mode, int64_t value_mode) {
  const int64_t T = (int64_t)grads.size();
  TORCH_CHECK_VALUE((int64_t)residues.size() == T && (int64_t)residue_outs.size() == T &&
                        (int64_t)bin_sizes.size() == T,
                    "adacomp::compress_bucket: one residue, residue_out and bin size per gradient");
  TORCH_CHECK_VALUE(pieces >= 0, "adacomp::compress_bucket: pieces must be >= 0, got ", pieces);
  const bool split = pieces > 0;  // 0: one payload of the tensor's shape
  if (!split) pieces = 1;
  const int kind = (int)value_mode;
  std::vector<SelectPass> sel;
  sel.reserve(T);
  std::vector<std::vector<Piece>> layout(T);
  auto info = at::empty({T, 3}, at::kLong);
  int64_t* inf = info.data_ptr<int64_t>();
  size_t sp = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(sp < shapes.size() && shapes[sp] >= 0 && shapes[sp] <= kMaxNdim &&
                          sp + 1 + shapes[sp] <= shapes.size(),
                      "adacomp::compress_bucket: shapes must hold ndim then the sizes, per gradient");
    const int ndim = (int)shapes[sp];
    const int64_t* dims = shapes.data() + sp + 1;
    sp += 1 + ndim;
    const at::Tensor& g = grads[t];
    int64_t numel = 1;
    for (int i = 0; i < ndim; ++i) numel *= dims[i];
    TORCH_CHECK_VALUE(numel == g.numel(), "adacomp::compress_bucket: gradient ", t, " has ", g.numel(),
                      " elements, its shape says ", numel);
    const int64_t L = bin_sizes[t];
    sel.push_back(select_pass(g, residues[t], const_cast<at::Tensor&>(residue_outs[t]), L, scale_mode,
                              value_mode));
    const SelectPass& s = sel.back();
    const int64_t k = s.k;
    const bool bad = s.bad;
    const float scale = s.scale;
    // exchange.all_zero: the head first, the whole gradient only if the head is all zero.
    const float* gp = g.data_ptr<float>();
    bool zero = true;
    for (int64_t i = 0; i < std::min<int64_t>(numel, 256) && zero; ++i) zero = gp[i] == 0.0f;
    for (int64_t i = 256; i < numel && zero; ++i) zero = gp[i] == 0.0f;
    inf[3 * t] = k;
    inf[3 * t + 1] = bad ? 1 : 0;
    inf[3 * t + 2] = zero ? 1 : 0;
    std::vector<Piece>& ps = layout[t];
    if (!split) {
      Piece p;
      encode_header(p.header, dims, ndim, L, bad ? 0 : k, kind, bad, bad ? NAN : scale);
      p.b1 = s.nb;
      p.e1 = k;
      p.width = offset_width(L);
      ps.push_back(std::move(p));
    } else {
      int64_t b = 0, e = 0;
      for (int64_t piece = 0; piece < pieces; ++piece) {
        const int64_t start = shard_edge(numel, L, pieces, piece), end = shard_edge(numel, L, pieces, piece + 1);
        const int64_t sbin = std::max<int64_t>(1, std::min(L, end - start));
        const int64_t len = end - start;
        Piece p;
        p.b0 = b;
        p.e0 = e;
        const int64_t b1 = (end + L - 1) / L;
        if (!bad)
          for (; b < b1; ++b) e += s.cnt[b];
        b = b1;
        p.b1 = b;
        p.e1 = e;
        p.width = offset_width(sbin);
        encode_header(p.header, &len, 1, sbin, bad ? 0 : p.e1 - p.e0, kind, bad, bad ? NAN : scale);
        ps.push_back(std::move(p));
      }
    }
    for (Piece& p : ps) {
      if (!bad)
        stream_bytes(p.b1 - p.b0, p.e1 - p.e0, field_bits(p.width, kind), kind,
                     &p.count_bytes, &p.entry_bytes, &p.value_bytes);
      p.size = (int64_t)p.header.size() + p.count_bytes + p.entry_bytes + p.value_bytes;
    }
  }
  auto sizes = at::empty({pieces, T}, at::kLong);
  int64_t* sz = sizes.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t s = 0; s < pieces; ++s)
    for (int64_t t = 0; t < T; ++t) total += (sz[s * T + t] = layout[t][s].size);
  auto data = at::empty({total}, at::kByte);
  // Piece-major: every tensor's piece 0, then every tensor's piece 1, ... (what the sharded
  // exchange's all-to-all sends to owner s is one contiguous range).
  uint8_t* out = data.data_ptr<uint8_t>();
  for (int64_t s = 0; s < pieces; ++s) {
    for (int64_t t = 0; t < T; ++t) {
      Piece& p = layout[t][s];
      std::memcpy(out, p.header.data(), p.header.size());
      p.body = out + p.header.size();
      std::memset(p.body, 0, p.count_bytes + p.entry_bytes);  // the bit streams are OR-ed in
      out += p.size;
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const SelectPass& s = sel[t];
    at::parallel_for(0, s.n_chunks, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        if (s.bad)  // no body; the residue is finished all the same (the caller discards it)
          finish_range(s, c, s.start[c], s.start[c + 1], [](int64_t, int32_t, float) {});
        else
          encode_chunk(s, layout[t], kind, c);
      }
    });
  }
  return {data, sizes, info};
}

// ----------------------------------------------------------------------------- decoding

// Python's repr of what the error messages print, so that they read as parse_header's.
std::string py_tuple(const std::vector<uint64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  if (v.size() == 1) s += ",";
  return s + ")";
}

std::string py_bytes(const uint8_t* p, int n) {
  bool squote = false, dquote = false;
  for (int i = 0; i < n; ++i) {
    squote |= p[i] == '\'';
    dquote |= p[i] == '"';
  }
  const char q = (squote && !dquote) ? '"' : '\'';
  std::string s = "b";
  s += q;
  for (int i = 0; i < n; ++i) {
    const uint8_t c = p[i];
    char buf[8];
    if (c == q || c == '\\') {
      s += '\\';
      s += (char)c;
    } else if (c == '\t') {
      s += "\\t";
    } else if (c == '\n') {
      s += "\\n";
    } else if (c == '\r') {
      s += "\\r";
    } else if (c < 0x20 || c >= 0x7F) {
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      s += buf;
    } else {
      s += (char)c;
    }
  }
  return s + q;
}

// repr(float(x)): the shortest digits that round-trip, in Python's layout.
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  std::string sign = std::signbit(x) ? "-" : "";
  x = std::fabs(x);
  if (x == 0.0) return sign + "0.0";
  char buf[64];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*e", prec - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string m(buf);
  const size_t epos = m.find('e');
  const int exp10 = std::atoi(m.c_str() + epos + 1);
  std::string digits;
  for (size_t i = 0; i < epos; ++i)
    if (m[i] != '.') digits += m[i];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  const int nd = (int)digits.size();
  const int decpt = exp10 + 1;
  std::string s;
  if (decpt <= -4 || decpt > 16) {
    s = digits.substr(0, 1);
    if (nd > 1) s += "." + digits.substr(1);
    std::snprintf(buf, sizeof(buf), "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    s += buf;
  } else if (decpt <= 0) {
    s = "0." + std::string(-decpt, '0') + digits;
  } else if (decpt >= nd) {
    s = digits + std::string(decpt - nd, '0') + ".0";
  } else {
    s = digits.substr(0, decpt) + "." + digits.substr(decpt);
  }
  return sign + s;
}

// The exact decimal product of `dims` (Python's math.prod), for the "claims N elements"
// message when it does not fit 64 bits.
std::string big_product(const std::vector<uint64_t>& dims) {
  std::vector<uint32_t> limbs = {1};  // base 1e9, least significant first
  for (uint64_t d : dims) {
    unsigned __int128 carry = 0;
    for (uint32_t& l : limbs) {
      const unsigned __int128 v = (unsigned __int128)l * d + carry;
      l = (uint32_t)(v % 1000000000u);
      carry = v / 1000000000u;
    }
    while (carry) {
      limbs.push_back((uint32_t)(carry % 1000000000u));
      carry /= 1000000000u;
    }
  }
  while (limbs.size() > 1 && limbs.back() == 0) limbs.pop_back();
  std::string s = std::to_string(limbs.back());
  char buf[16];
  for (size_t i = limbs.size() - 1; i-- > 0;) {
    std::snprintf(buf, sizeof(buf), "%09u", limbs[i]);
    s += buf;
  }
  return s;
}

struct Parsed {
  int64_t numel = 0, bin_size = 0, n_sent = 0, header_bytes = 0;
  int kind = 0;
  bool nonfinite = false;
  float scale = 0.0f;
};

[[noreturn]] void fail(const std::string& msg) {
  TORCH_CHECK_VALUE(false, msg);
  __builtin_unreachable();
}

// adacomp.payload.parse_header(buf, total_len, shape=expected): the same checks, in the same
// order, with the same messages.
Parsed parse_header(const uint8_t* buf, int64_t total_len, const std::vector<uint64_t>& expected) {
  const int64_t n = std::min<int64_t>(total_len, 5 + (kMaxNdim + 2) * kMaxVarintBytes + 4);
  if (n < 5) fail("adacomp payload truncated: " + std::to_string(n) + " bytes, a header needs at least 5");
  if (buf[0] != 'A' || buf[1] != 'C')
    fail("not an adacomp payload: magic " + py_bytes(buf, 2) + ", expected b'AC'");
  if (buf[2] != kWireVersion)
    fail("adacomp payload format version " + std::to_string(buf[2]) +
         " is not supported (this build reads version 1)");
  const uint8_t flags = buf[3];
  if (flags & ~0x07) {
    char f[16];
    std::snprintf(f, sizeof(f), "%#04x", flags);
    fail(std::string("adacomp payload has unknown flag bits set: ") + f);
  }
  Parsed h;
  h.nonfinite = flags & 1;
  h.kind = (flags >> 1) & 3;
  const int ndim = buf[4];
  if (ndim > kMaxNdim)
    fail("adacomp payload claims " + std::to_string(ndim) + " dimensions (at most " +
         std::to_string(kMaxNdim) + ")");
  int64_t pos = 5;
  auto varint = [&](const std::string& what) -> uint64_t {
    uint64_t v = 0;
    for (int i = 0; i < kMaxVarintBytes; ++i) {
      if (pos + i >= n) fail("adacomp payload truncated inside the header field " + what);
      const uint8_t byte = buf[pos + i];
      v |= (uint64_t)(byte & 0x7F) << (7 * i);
      if (!(byte & 0x80)) {
        if (byte == 0 && i > 0) fail("adacomp payload header field " + what + " has a redundant zero byte");
        pos += i + 1;
        return v;
      }
    }
    fail("adacomp payload header field " + what + " is longer than " + std::to_string(kMaxVarintBytes) +
         " bytes");
  };
  std::vector<uint64_t> shape(ndim);
  for (int i = 0; i < ndim; ++i) shape[i] = varint("shape[" + std::to_string(i) + "]");
  const uint64_t bin_size = varint("bin_size");
  const uint64_t n_sent = varint("n_sent");
  // numel, saturated above 2^48 (then printed exactly)
  uint64_t numel = 1;
  bool huge = false;
  for (uint64_t d : shape) {
    if (d == 0) {
      numel = 0;
      huge = false;
      break;
    }
    if (!huge && numel > (uint64_t)kMaxNumel / d) huge = true;
    if (!huge) numel *= d;
  }
  if (huge || numel > (uint64_t)kMaxNumel)
    fail("adacomp payload claims " + big_product(shape) + " elements (at most " + std::to_string(kMaxNumel) +
         ")");
  if (shape != expected)
    fail("adacomp payload claims shape " + py_tuple(shape) + ", the receiver expects " + py_tuple(expected));
  if (bin_size < 1 || bin_size > std::max<uint64_t>(numel, 1) || bin_size > (uint64_t)kMaxBinSize)
    fail("adacomp payload has bin_size " + std::to_string(bin_size) + " for " + std::to_string(numel) +
         " elements (must be between 1 and the element count)");
  if (n_sent > numel)
    fail("adacomp payload claims " + std::to_string(n_sent) + " sent elements of " + std::to_string(numel));
  if ((h.nonfinite || h.kind == kValueDense) && n_sent != 0)
    fail("adacomp payload: a non-finite or dense payload must have n_sent = 0");
  if (h.kind == kValueTernary) {
    if (pos + 4 > n) fail("adacomp payload truncated inside the header field scale");
    uint32_t bits = 0;
    for (int i = 0; i < 4; ++i) bits |= (uint32_t)buf[pos + i] << (8 * i);
    h.scale = bits_float(bits);
    pos += 4;
    if (!h.nonfinite && n_sent && !(std::isfinite(h.scale) && h.scale > 0))
      fail("adacomp payload has invalid scale " + py_float((double)h.scale) + " for sent elements");
  }
  h.numel = (int64_t)numel;
  h.bin_size = (int64_t)bin_size;
  h.n_sent = (int64_t)n_sent;
  h.header_bytes = pos;
  const BodyLayout l = body_layout(h.numel, h.bin_size, h.n_sent, h.kind);
  const int64_t implied = pos + (h.nonfinite ? 0 : l.count_bytes + l.entry_bytes + l.value_bytes);
  if (total_len != implied)
    fail(std::string("adacomp payload ") + (total_len < implied ? "truncated" : "oversized") + ": " +
         std::to_string(total_len) + " bytes, its header implies " + std::to_string(implied));
  return h;
}

struct Entry : DecodedBody {
  Parsed head;
  bool nonfinite = false;
};

// entries: per payload, [out, start, end, row, offset, nbytes, ndim, dims...]; consecutive
// entries with the same (out, start, end) are one sum (in entry order) into that range of
// outs[out], which is zeroed first (NaN if a payload of it is non-finite), then divided by
// divisor. Ranges must not overlap. Every header and body is checked before anything is
// written.
void decode_bucket_cpu(at::TensorList outs, at::TensorList rows, at::IntArrayRef entries, int64_t divisor) {
  TORCH_CHECK_VALUE(divisor >= 1, "adacomp::decode_bucket_: divisor must be >= 1, got ", divisor);
  for (const at::Tensor& o : outs)
    TORCH_CHECK_VALUE(o.scalar_type() == at::kFloat && o.is_contiguous() && o.device().is_cpu(),
                      "adacomp::decode_bucket_: outputs must be contiguous fp32 CPU tensors");
  for (const at::Tensor& r : rows)
    TORCH_CHECK_VALUE(r.scalar_type() == at::kByte && r.dim() == 1 && r.is_contiguous() && r.device().is_cpu(),
                      "adacomp::decode_bucket_: rows must be contiguous 1-D uint8 CPU tensors");
  // The table's checks and messages, and its groups (consecutive entries with one range;
  // ranges must not overlap): plan_check, shared with the CUDA op.
  const CheckPlan plan = check_plan_of(outs, rows, entries);
  const std::vector<CheckEntry>& es = plan.entries;
  std::vector<Entry> ent(es.size());
  std::vector<size_t> group_start;
  for (size_t i = 0; i < es.size(); ++i)
    if (i == 0 || es[i].group != es[i - 1].group) group_start.push_back(i);
  group_start.push_back(es.size());
  const size_t G = group_start.size() - 1;
  // Validate: per group, every header (in order), then every body (in order), as
  // Payload.from_tensor for each payload of a decompress_sum call, then the call.
  for (size_t g = 0; g < G; ++g) {
    for (size_t i = group_start[g]; i < group_start[g + 1]; ++i) {
      const int64_t* dims = plan.dims.data() + es[i].dims_off;
      ent[i].head = parse_header(es[i].data, es[i].nbytes, std::vector<uint64_t>(dims, dims + es[i].ndim));
    }
    for (size_t i = group_start[g]; i < group_start[g + 1]; ++i) {
      Entry& e = ent[i];
      const Parsed& h = e.head;
      if (h.nonfinite) {
        e.nonfinite = true;
        continue;
      }
      const BodyLayout l = body_layout(h.numel, h.bin_size, h.n_sent, h.kind);
      const uint8_t* body = es[i].data + h.header_bytes;
      const int64_t nbody = es[i].nbytes - h.header_bytes;
      const int code = decode_body(body, nbody, l, h.scale, &e);
      TORCH_CHECK_VALUE(code == kOk, "adacomp payload ", i - group_start[g], " is malformed: ",
                        decode_error_message(code));
    }
  }
  // Apply, block by block (kApplyBlock elements): each block of a range is zeroed, receives
  // its payloads' contributions in order (the sum decompress_sum_ forms) and is divided,
  // while it is in cache: one pass over the outputs. Blocks are disjoint, so they run in
  // parallel.
  std::vector<std::pair<size_t, int64_t>> blocks;  // (group, first element in the range)
  for (size_t g = 0; g < G; ++g)
    for (int64_t lo = 0; lo < plan.groups[g].numel; lo += kApplyBlock) blocks.emplace_back(g, lo);
  std::vector<char> group_nonfinite(G, 0);
  for (size_t g = 0; g < G; ++g)
    for (size_t i = group_start[g]; i < group_start[g + 1]; ++i) group_nonfinite[g] |= ent[i].nonfinite;
  const float d = (float)divisor;
  at::parallel_for(0, (int64_t)blocks.size(), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const auto [g, lo] = blocks[k];
      const int64_t hi = std::min(plan.groups[g].numel, lo + kApplyBlock);
      float* o = plan.groups[g].out + lo;
      if (group_nonfinite[g]) {
        std::fill(o, o + (hi - lo), NAN);
        continue;
      }
      std::fill(o, o + (hi - lo), 0.0f);
      for (size_t i = group_start[g]; i < group_start[g + 1]; ++i) add_block(ent[i], o, lo, hi);
      if (divisor > 1)  // the average (Tensor.div_'s rounding)
        for (int64_t j = 0; j < hi - lo; ++j) o[j] /= d;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(adacomp, CPU, m) {
  m.impl("compress_bucket", &compress_bucket_cpu);
  m.impl("decode_bucket_", &decode_bucket_cpu);
}

}  // namespace adacomp
