// GPU probe: how fast can an H200 add fp32 rows into scattered rows of a buffer?
//
//     nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/probe_reduce bench/probe_reduce.cu
//     /tmp/probe_reduce > $OUT/probe_reduce.json
//
// The DSA attention backward is bound by its dK / dV reductions: one 512-byte fp32 row per
// (union block, key, KV group) for dK and one for dV, added with `red.global.add.v4.f32` (what
// Triton's `tl.atomic_add` emits), 532 GB at 128K. This probe asks whether the Hopper bulk-copy
// engine's reduction (`cp.reduce.async.bulk ... .add.f32`, shared memory -> global, the way
// FlashAttention-3 accumulates dQ) moves the same rows faster than warps issuing `red.v4`, and
// whether 2 KB rows (the 4 KV groups of one key, adjacent in a [T, Hkv, D] buffer) help. No
// products, no gathers: payload values are constants, destinations come from a fixed hash.
// Patterns: keys uniform over 128K keys (buffers beyond L2), or folded into a 4K-key band (L2).
// Also a plain `st.global.v4` of the same rows (write bandwidth, not a reduction) for scale.
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); return 1; } } while (0)

__device__ __forceinline__ uint32_t mix(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16; return x;
}

// Destination row of entry e: rows are `row_floats` wide, `n_rows` of them in the buffer.
__global__ void make_rows(int* rows, long n, uint32_t n_rows) {
  long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (e < n) rows[e] = (int)(mix((uint32_t)e * 2654435761U + 12345U) % n_rows);
}

// One warp per row, 4 adjacent floats per lane per 128-float stripe: RED adds them
// (red.global.add.v4.f32), otherwise plain 16-byte stores write them (the bytes without the sum).
template <bool RED>
__global__ void k_warp_rows(float* buf, const int* __restrict__ rows, long n, int row_floats, int per_cta) {
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  long base = (long)blockIdx.x * per_cta;
  for (int i = warp; i < per_cta; i += nw) {
    long e = base + i;
    if (e >= n) return;
    float* dst = buf + (long)rows[e] * row_floats;
    for (int c = lane * 4; c < row_floats; c += 128) {
      if (RED)
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                     :: "l"(dst + c), "f"(1.0f), "f"(2.0f), "f"(3.0f), "f"(4.0f) : "memory");
      else
        asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};"
                     :: "l"(dst + c), "f"(1.0f), "f"(2.0f), "f"(3.0f), "f"(4.0f) : "memory");
    }
  }
}

// One thread per row: a bulk reduction of the whole row from a shared-memory tile of 32 rows.
__global__ void k_bulk(float* buf, const int* __restrict__ rows, long n, int row_floats, int per_cta) {
  extern __shared__ __align__(128) float tile[];
  for (int i = threadIdx.x; i < 32 * row_floats; i += blockDim.x) tile[i] = 1.0f;
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  long base = (long)blockIdx.x * per_cta;
  for (int i = threadIdx.x; i < per_cta; i += blockDim.x) {
    long e = base + i;
    if (e >= n) break;
    float* dst = buf + (long)rows[e] * row_floats;
    uint32_t src = (uint32_t)__cvta_generic_to_shared(tile + (i & 31) * row_floats);
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                 :: "l"(dst), "r"(src), "r"(row_floats * 4) : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

int main() {
  const int keys = 131072, groups = 4, D = 128;
  const long bytes_total = 16L << 30;  // 16 GB of row traffic per timed launch
  float* buf;
  CK(cudaMalloc(&buf, (size_t)keys * groups * D * 4));
  CK(cudaMemset(buf, 0, (size_t)keys * groups * D * 4));
  int* rows;
  const long max_n = bytes_total / (D * 4);
  CK(cudaMalloc(&rows, max_n * 4));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  printf("{\"what\": \"fp32 row reductions into scattered rows, 16 GB of rows per launch\", \"results\": [\n");
  bool first = true;
  for (int row_floats : {D, groups * D}) {
    const long n = bytes_total / (row_floats * 4);
    for (int band : {0, 1}) {
      // band 0: every key of 128K (buffer 256 MB, beyond the 60 MB L2); band 1: 4K keys (8 MB).
      uint32_t n_rows = (uint32_t)((band ? 4096L : (long)keys) * groups * D / row_floats);
      make_rows<<<(unsigned)((n + 255) / 256), 256>>>(rows, n, n_rows);
      CK(cudaGetLastError());
      for (int kind = 0; kind < 3; ++kind) {
        for (int threads : {128, 256}) {
          const int per_cta = 2048;
          const unsigned grid = (unsigned)((n + per_cta - 1) / per_cta);
          size_t smem = kind == 2 ? (size_t)32 * row_floats * 4 : 0;
          if (kind == 2) CK(cudaFuncSetAttribute(k_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
          float best = 1e30f;
          for (int rep = 0; rep < 4; ++rep) {
            CK(cudaEventRecord(a));
            if (kind == 0) k_warp_rows<true><<<grid, threads>>>(buf, rows, n, row_floats, per_cta);
            else if (kind == 1) k_warp_rows<false><<<grid, threads>>>(buf, rows, n, row_floats, per_cta);
            else k_bulk<<<grid, threads, smem>>>(buf, rows, n, row_floats, per_cta);
            CK(cudaEventRecord(b));
            CK(cudaEventSynchronize(b));
            CK(cudaGetLastError());
            float ms; CK(cudaEventElapsedTime(&ms, a, b));
            if (rep > 0 && ms < best) best = ms;
          }
          const char* names[] = {"red.global.add.v4.f32", "st.global.v4 (no reduction)", "cp.reduce.async.bulk add.f32"};
          printf("%s  {\"op\": \"%s\", \"row_bytes\": %d, \"keys\": %s, \"threads\": %d, \"ms\": %.3f, \"GB_per_s\": %.1f, \"ms_for_532GB\": %.1f}",
                 first ? "" : ",\n", names[kind], row_floats * 4, band ? "\"4K band\"" : "\"128K\"", threads, best,
                 bytes_total / (best * 1e6), 532e9 / (bytes_total / (best * 1e-3)) * 1e3);
          first = false;
        }
      }
    }
  }
  printf("\n]}\n");
  return 0;
}
