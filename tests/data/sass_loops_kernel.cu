// sass_loops_kernel.cu — test input for bench/sass_budget.py's loop finder (tests/test_sass_budget.py).
// Not part of the extension. Three loops with known mma.sync counts per iteration:
//   side loop:    1 mma per iteration (nested inside `outer`, which therefore is not innermost)
//   steady loop:  2 mma per iteration, plus a warp shuffle (its out-of-line divergence stub must not be
//                 mistaken for a loop)
//   scalar loop:  no mma
// so the steady-state loop (innermost, most HMMA) is the 2-mma loop.
#include <cstdint>

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__global__ void sass_loops_kernel(const uint4* __restrict__ in, float* __restrict__ out, int n_outer, int n_side,
                                  int n_steady, int n_scalar) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int lane = threadIdx.x & 31;
#pragma unroll 1
  for (int o = 0; o < n_outer; ++o) {
#pragma unroll 1
    for (int i = 0; i < n_side; ++i) {  // side loop: 1 mma
      const uint4 v = in[(o * n_side + i) * 32 + lane];
      const uint32_t a[4] = {v.x, v.y, v.z, v.w}, b[2] = {v.x ^ v.y, v.z ^ v.w};
      mma_bf16(acc, a, b);
    }
  }
#pragma unroll 1
  for (int k = 0; k < n_steady; ++k) {  // steady loop: 2 mma and a shuffle
    uint4 v = in[k * 32 + lane];
    if (v.x & 1u) v.y += in[v.z & 1023u].y;  // a lane-divergent branch: the shuffle below needs its slow path
    const uint32_t x = __shfl_sync(0xffffffffu, v.x, (lane + k) & 31);
    const uint32_t a[4] = {x, v.y, v.z, v.w}, b0[2] = {v.x, v.y}, b1[2] = {v.z, v.w};
    mma_bf16(acc, a, b0);
    mma_bf16(acc, a, b1);
  }
  float s = 0.f;
#pragma unroll 1
  for (int j = 0; j < n_scalar; ++j) s += __uint_as_float(in[j].x);  // scalar loop: no mma
  out[threadIdx.x] = acc[0] + acc[1] + acc[2] + acc[3] + s;
}
