// The CUDA core of the per-bucket ops (docs/algorithm.md section 6): writing a bucket's
// payloads from its selections (csrc/wire.h) and validating and summing received payloads
// (csrc/wire_check.h), as plain CUDA C++ with no PyTorch header (.ci/nvcc_check.sh compiles
// it alone). csrc/cuda/bucket_binding.cu is the PyTorch layer.
//
// Every function only enqueues work on `stream`; pointers are device pointers unless said
// otherwise. Each returns cudaErrorInvalidValue for invalid arguments, else the launch status.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "../wire.h"
#include "../wire_check.h"

namespace adacomp {

// Bytes of scratch device memory summarize_launch needs (no initialisation needed).
size_t summarize_workspace_bytes(int64_t numel, int64_t bin_size);

// Phase 1 after select_launch for one gradient of numel elements: bin_end[n_bins] = inclusive
// scan of counts (a multi-block scan), and the summary row (wire.h: n_sent, nonfinite,
// all-zero flag, scale bits, entries before each of pieces + 1 shard edges; pieces >= 1).
cudaError_t summarize_launch(const float* grad, int64_t numel, int64_t bin_size, int64_t pieces,
                             const int32_t* counts, const int64_t* sel_info, const float* scale,
                             int64_t* bin_end, int64_t* row, void* workspace, cudaStream_t stream);

// Phase 2: out[0, total) = the bucket's payloads (one thread per byte, wire_byte).
cudaError_t write_wire_launch(const WirePiece* pieces, int64_t n_pieces, const WireTensor* tensors,
                              const uint8_t* headers, uint8_t* out, int64_t total, cudaStream_t stream);

// Bytes of scratch device memory check_bucket_launch needs (no initialisation needed).
size_t check_workspace_bytes(int64_t total_bytes);

// Validation steps 1-5 of wire_check.h for n entries of total_bytes bytes in all. parsed:
// n CheckParsed; zeros_before: total_bytes + 1 int64; flags: 1 + n_groups int32, zeroed
// here: flags[0] becomes non-zero if any payload is rejected, flags[1 + g] if group g holds
// a non-finite payload.
cudaError_t check_bucket_launch(const CheckEntry* entries, int64_t n, const int64_t* dims, int64_t total_bytes,
                                int64_t n_groups, CheckParsed* parsed, int64_t* zeros_before, int32_t* flags,
                                void* workspace, cudaStream_t stream);

// After a successful check: every group's range zeroed (NaN if it holds a non-finite
// payload), its payloads added in position order (positions = the most payloads of a
// group; CheckPlan's pos_* lists: pos_entry and pos_base on the device, pos_first and
// pos_bytes on the host), and the sums divided by divisor (>= 1, IEEE division).
cudaError_t apply_bucket_launch(const CheckEntry* entries, int64_t n, const CheckParsed* parsed,
                                const int64_t* zeros_before, const CheckGroup* groups, int64_t n_groups,
                                int64_t total_elems, const int32_t* flags, const int64_t* pos_entry,
                                const int64_t* pos_base, const int64_t* pos_first_host,
                                const int64_t* pos_bytes_host, int64_t positions, int64_t divisor,
                                cudaStream_t stream);

}  // namespace adacomp
