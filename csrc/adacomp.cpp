// The op schemas, declared once. Kernels register themselves per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; the fake (meta) implementations used by
// torch.compile live in adacomp/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace adacomp {
const char* select_isa();  // csrc/cpu/select_kernel.cpp
}

extern "C" {
// Importing adacomp._C loads this shared library, which runs the registrations below.
// The module itself has no Python-level functions (no pybind11 needed).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(adacomp, m) {
  // One fused streaming pass of docs/algorithm.md section 1 steps 1-6 over one flat tensor.
  // residue_out receives R' = G - Q (it may alias residue). Returns
  // (counts int32[n_bins], offsets int32[cap], values fp32[cap], scale fp32[1],
  //  info int64[2] = [n_sent, nonfinite]); cap == n_sent on CPU, numel on CUDA
  // (no host synchronisation there: read n_sent from info).
  m.def(
      "select(Tensor grad, Tensor residue, Tensor(a!) residue_out, int bin_size, "
      "int scale_mode, int value_mode) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Validates, then adds, the bodies of many payloads into out, in list order.
  // meta holds 8 integers per payload:
  //   body_offset, numel, bin_size, n_sent, value_kind, nonfinite, scale_bits, reserved
  m.def("decompress_sum_(Tensor(a!) out, Tensor[] data, int[] meta) -> ()");
  // The body of one payload (count stream, entry stream, value stream) from a selection
  // result: counts int32[n_bins], offsets int32[n_sent], values fp32[n_sent]; kind 0
  // ternary (sign bit above the offset), 1 fp16, 2 fp32. Returns uint8[body bytes].
  m.def("encode_body(Tensor counts, Tensor offsets, Tensor values, int offset_width, int kind) -> Tensor");
  // One call per bucket (CPU): select, residue update and the whole payload (header and
  // body) of every gradient, into one byte buffer, piece-major (piece s of every tensor,
  // then piece s + 1). pieces = 0: one payload per tensor, of its shape; pieces >= 1: that
  // many bin-aligned 1-D shard payloads. shapes holds per gradient its ndim, then its
  // sizes. Returns (data uint8, sizes int64[max(pieces, 1), T],
  // info int64[T, 3] = [n_sent, nonfinite, all-zero gradient]).
  m.def(
      "compress_bucket(Tensor[] grads, Tensor[] residues, Tensor(a!)[] residue_outs, int[] bin_sizes, "
      "int[] shapes, int pieces, int scale_mode, int value_mode) -> (Tensor, Tensor, Tensor)");
  // Parse and validate every payload of a bucket (header against the expected shape, and
  // body), then zero and sum each range of an output. entries: per payload
  // [out, start, end, row, byte offset, nbytes, ndim, sizes...]; consecutive payloads with the
  // same (out, start, end) are summed in order, and the sum divided by divisor (>= 1; the
  // float division, as Tensor.div_). Nothing is written unless all are valid.
  m.def("decode_bucket_(Tensor(a!)[] outs, Tensor[] rows, int[] entries, int divisor=1) -> ()");
  // The vector version the CPU selection runs on this machine: "avx2" or "generic" (at
  // most what ADACOMP_CPU_ISA allows).
  m.def("cpu_isa() -> str", [] { return std::string(adacomp::select_isa()); });
}
