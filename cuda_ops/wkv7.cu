// WKV-7 forward and backward kernels (the math is derived in vrwkv_core/kernels/cuda.py).
//
// One thread block per (batch, head), N threads. Rows of S (v index i) evolve independently,
// so in the forward thread i keeps row i of S in registers. Every C steps the block stages
// the next C steps of r, w, k, v, a, b in shared memory (one load phase per chunk, no barrier
// per step) and, when training, writes S to a checkpoint and S_{t-1} a_t to `sa`.
//
// The backward walks the chunks in reverse. Thread `me` holds three register rows:
//   G[j]  = dL/dS[me][j]  (row `me` of the adjoint: gives dv and gb = G b in-thread)
//   GT[i] = dL/dS[i][me]  (column `me` of the adjoint: gives dk, db, dw in-thread)
//   Sc[i] = S[i][me]      (column `me` of the state: gives dr, dw, da in-thread)
// S_{t-1} is rebuilt from S_t by inverting the step, using the saved sa:
//   S_{t-1}[i][j] = (S_t[i][j] - v_i k_j - sa_i b_j) / w_j,
// at most C steps from a checkpoint, so the rounding growth stays bounded by w^-C.
#include "wkv7.h"

#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int N = VRWKV_N;
constexpr int C = VRWKV_C;
#if VRWKV_BF16
using F = __nv_bfloat16;
#else
using F = float;
#endif

static_assert(N % 32 == 0 && N <= 64, "head size must be 32 or 64 (registers hold 3 rows of N floats)");
static_assert(C >= 1 && C <= 32, "chunk length must be in [1, 32]");
static_assert(9 * C * N * 4 + 2 * N * 4 <= 48 * 1024, "backward tiles must fit in 48 KB of static shared memory");

// torch builds with __CUDA_NO_BFLOAT16_CONVERSIONS__: convert with explicit intrinsics.
#if VRWKV_BF16
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
#else
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float from_f(float x) { return x; }
#endif

template <bool SAVE>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ lw_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const float* __restrict__ s0, F* __restrict__ y_, float* __restrict__ sT, float* __restrict__ ckpt,
    float* __restrict__ sa_) {
  __shared__ __align__(16) float tr[C][N], tw[C][N], tk[C][N], tv[C][N], ta[C][N], tb[C][N];

  const int bh = blockIdx.x, i = threadIdx.x;
  const int bi = bh / H, hi = bh % H;
  const int64_t stride_t = (int64_t)H * N;                     // between steps in [B,T,H,N]
  const int64_t base = ((int64_t)bi * T * H + hi) * N + i;     // element (bi, 0, hi, i)
  const int nchunks = (T + C - 1) / C;

  float S[N];  // row i of the state
  if (s0 != nullptr) {
    const float4* p = reinterpret_cast<const float4*>(s0 + ((int64_t)bh * N + i) * N);
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 x = p[q];
      S[4 * q] = x.x; S[4 * q + 1] = x.y; S[4 * q + 2] = x.z; S[4 * q + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) S[j] = 0.f;
  }

  for (int c = 0; c < nchunks; ++c) {
    const int t0 = c * C;
    const int L = min(C, T - t0);
    __syncthreads();  // the previous chunk's tiles are no longer read
#pragma unroll
    for (int s = 0; s < C; ++s) {
      if (s < L) {
        const int64_t o = base + (int64_t)(t0 + s) * stride_t;
        tr[s][i] = to_f(r_[o]);
        tw[s][i] = expf(to_f(lw_[o]));
        tk[s][i] = to_f(k_[o]);
        tv[s][i] = to_f(v_[o]);
        ta[s][i] = to_f(a_[o]);
        tb[s][i] = to_f(b_[o]);
      }
    }
    __syncthreads();

    for (int s = 0; s < L; ++s) {
      const float4* a4 = reinterpret_cast<const float4*>(ta[s]);
      float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;  // four chains: sa = S a
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 x = a4[q];
        p0 = fmaf(S[4 * q], x.x, p0);
        p1 = fmaf(S[4 * q + 1], x.y, p1);
        p2 = fmaf(S[4 * q + 2], x.z, p2);
        p3 = fmaf(S[4 * q + 3], x.w, p3);
      }
      const float sai = (p0 + p1) + (p2 + p3);
      const float vi = tv[s][i];
      const float4* w4 = reinterpret_cast<const float4*>(tw[s]);
      const float4* k4 = reinterpret_cast<const float4*>(tk[s]);
      const float4* b4 = reinterpret_cast<const float4*>(tb[s]);
      const float4* r4 = reinterpret_cast<const float4*>(tr[s]);
      float y0 = 0.f, y1 = 0.f;
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 w = w4[q], kk = k4[q], bb = b4[q], rr = r4[q];
        S[4 * q] = fmaf(vi, kk.x, fmaf(sai, bb.x, S[4 * q] * w.x));
        S[4 * q + 1] = fmaf(vi, kk.y, fmaf(sai, bb.y, S[4 * q + 1] * w.y));
        S[4 * q + 2] = fmaf(vi, kk.z, fmaf(sai, bb.z, S[4 * q + 2] * w.z));
        S[4 * q + 3] = fmaf(vi, kk.w, fmaf(sai, bb.w, S[4 * q + 3] * w.w));
        y0 = fmaf(S[4 * q], rr.x, y0);
        y1 = fmaf(S[4 * q + 1], rr.y, y1);
        y0 = fmaf(S[4 * q + 2], rr.z, y0);
        y1 = fmaf(S[4 * q + 3], rr.w, y1);
      }
      const int64_t o = base + (int64_t)(t0 + s) * stride_t;
      y_[o] = from_f(y0 + y1);
      if (SAVE) sa_[o] = sai;
    }
    if (SAVE) {
      // Transposed layout [j][i]: coalesced stores here, one contiguous row per thread in backward.
      float* p = ckpt + ((int64_t)bh * nchunks + c) * N * N + i;
#pragma unroll
      for (int j = 0; j < N; ++j) p[j * N] = S[j];
    }
  }

  float4* p = reinterpret_cast<float4*>(sT + ((int64_t)bh * N + i) * N);
#pragma unroll
  for (int q = 0; q < N / 4; ++q) p[q] = make_float4(S[4 * q], S[4 * q + 1], S[4 * q + 2], S[4 * q + 3]);
}

__global__ void __launch_bounds__(N) wkv7_backward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ lw_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_, const F* __restrict__ dy_,
    const float* __restrict__ dsT, const float* __restrict__ ckpt, const float* __restrict__ sa_, int zero_s0,
    F* __restrict__ dr_, F* __restrict__ dlw_, F* __restrict__ dk_, F* __restrict__ dv_, F* __restrict__ da_,
    F* __restrict__ db_, float* __restrict__ ds0) {
  __shared__ __align__(16) float tr[C][N], tw[C][N], tiw[C][N], tk[C][N], tv[C][N], ta[C][N], tb[C][N],
      tdy[C][N], tsa[C][N];
  __shared__ __align__(16) float tgb[2][N];

  const int bh = blockIdx.x, me = threadIdx.x;
  const int bi = bh / H, hi = bh % H;
  const int64_t stride_t = (int64_t)H * N;
  const int64_t base = ((int64_t)bi * T * H + hi) * N + me;
  const int nchunks = (T + C - 1) / C;

  float G[N], GT[N], Sc[N];
  if (dsT != nullptr) {
    const float* p = dsT + (int64_t)bh * N * N;
    const float4* p4 = reinterpret_cast<const float4*>(p + me * N);
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 x = p4[q];
      G[4 * q] = x.x; G[4 * q + 1] = x.y; G[4 * q + 2] = x.z; G[4 * q + 3] = x.w;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) GT[i] = p[i * N + me];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) { G[j] = 0.f; GT[j] = 0.f; }
  }

  for (int c = nchunks - 1; c >= 0; --c) {
    const int t0 = c * C;
    const int L = min(C, T - t0);
    __syncthreads();
#pragma unroll
    for (int s = 0; s < C; ++s) {
      if (s < L) {
        const int64_t o = base + (int64_t)(t0 + s) * stride_t;
        const float lw = to_f(lw_[o]);
        tr[s][me] = to_f(r_[o]);
        tw[s][me] = expf(lw);
        tiw[s][me] = expf(-lw);
        tk[s][me] = to_f(k_[o]);
        tv[s][me] = to_f(v_[o]);
        ta[s][me] = to_f(a_[o]);
        tb[s][me] = to_f(b_[o]);
        tdy[s][me] = to_f(dy_[o]);
        tsa[s][me] = sa_[o];
      }
    }
    {  // S after the chunk's last step, column `me`
      const float4* p = reinterpret_cast<const float4*>(ckpt + (((int64_t)bh * nchunks + c) * N + me) * N);
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 x = p[q];
        Sc[4 * q] = x.x; Sc[4 * q + 1] = x.y; Sc[4 * q + 2] = x.z; Sc[4 * q + 3] = x.w;
      }
    }
    __syncthreads();

    for (int s = L - 1; s >= 0; --s) {
      // Row `me` of the adjoint: G_t = G + dy r^T; dv = G_t k; gb = G_t b; G_{t-1} = G_t diag(w) + gb a^T.
      const float dyi = tdy[s][me];
      const float4* r4 = reinterpret_cast<const float4*>(tr[s]);
      const float4* k4 = reinterpret_cast<const float4*>(tk[s]);
      const float4* b4 = reinterpret_cast<const float4*>(tb[s]);
      float dv0 = 0.f, dv1 = 0.f, gb0 = 0.f, gb1 = 0.f;
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 rr = r4[q], kk = k4[q], bb = b4[q];
        G[4 * q] = fmaf(dyi, rr.x, G[4 * q]);
        G[4 * q + 1] = fmaf(dyi, rr.y, G[4 * q + 1]);
        G[4 * q + 2] = fmaf(dyi, rr.z, G[4 * q + 2]);
        G[4 * q + 3] = fmaf(dyi, rr.w, G[4 * q + 3]);
        dv0 = fmaf(G[4 * q], kk.x, dv0);
        dv1 = fmaf(G[4 * q + 1], kk.y, dv1);
        dv0 = fmaf(G[4 * q + 2], kk.z, dv0);
        dv1 = fmaf(G[4 * q + 3], kk.w, dv1);
        gb0 = fmaf(G[4 * q], bb.x, gb0);
        gb1 = fmaf(G[4 * q + 1], bb.y, gb1);
        gb0 = fmaf(G[4 * q + 2], bb.z, gb0);
        gb1 = fmaf(G[4 * q + 3], bb.w, gb1);
      }
      const float gbi = gb0 + gb1;
      tgb[s & 1][me] = gbi;
      const float4* w4 = reinterpret_cast<const float4*>(tw[s]);
      const float4* a4 = reinterpret_cast<const float4*>(ta[s]);
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 w = w4[q], aa = a4[q];
        G[4 * q] = fmaf(gbi, aa.x, G[4 * q] * w.x);
        G[4 * q + 1] = fmaf(gbi, aa.y, G[4 * q + 1] * w.y);
        G[4 * q + 2] = fmaf(gbi, aa.z, G[4 * q + 2] * w.z);
        G[4 * q + 3] = fmaf(gbi, aa.w, G[4 * q + 3] * w.w);
      }
      const int64_t o = base + (int64_t)(t0 + s) * stride_t;
      dv_[o] = from_f(dv0 + dv1);
      __syncthreads();  // tgb[s & 1] complete; the other buffer is the one written next step

      // Column `me`: GT (adjoint) and Sc (state S_t -> S_{t-1}).
      const float rj = tr[s][me], wj = tw[s][me], aj = ta[s][me];
      // All three zero rebuild S_{-1} = 0 exactly when there is no initial state.
      const float iwj = (zero_s0 && t0 + s == 0) ? 0.f : tiw[s][me];
      const float kiw = tk[s][me] * iwj, biw = tb[s][me] * iwj;
      const float4* dy4 = reinterpret_cast<const float4*>(tdy[s]);
      const float4* v4 = reinterpret_cast<const float4*>(tv[s]);
      const float4* sa4 = reinterpret_cast<const float4*>(tsa[s]);
      const float4* gb4 = reinterpret_cast<const float4*>(tgb[s & 1]);
      float dr = 0.f, dk = 0.f, db = 0.f, dw = 0.f, da = 0.f;
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 d4 = dy4[q], vv4 = v4[q], s4 = sa4[q], g4 = gb4[q];
        const float dyv[4] = {d4.x, d4.y, d4.z, d4.w};
        const float vv[4] = {vv4.x, vv4.y, vv4.z, vv4.w};
        const float sav[4] = {s4.x, s4.y, s4.z, s4.w};
        const float gbv[4] = {g4.x, g4.y, g4.z, g4.w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int i = 4 * q + u;
          const float g = fmaf(rj, dyv[u], GT[i]);                            // G_t[i][me]
          dr = fmaf(Sc[i], dyv[u], dr);                                       // (S_t^T dy)_me
          dk = fmaf(g, vv[u], dk);                                            // (G_t^T v)_me
          db = fmaf(g, sav[u], db);                                           // (G_t^T sa)_me
          const float sp = fmaf(-sav[u], biw, fmaf(-vv[u], kiw, Sc[i] * iwj));  // S_{t-1}[i][me]
          dw = fmaf(g, sp, dw);                                               // dL/dw_me
          da = fmaf(sp, gbv[u], da);                                          // (S_{t-1}^T gb)_me
          GT[i] = fmaf(aj, gbv[u], g * wj);                                   // G_{t-1}[i][me]
          Sc[i] = sp;
        }
      }
      dr_[o] = from_f(dr);
      dk_[o] = from_f(dk);
      db_[o] = from_f(db);
      dlw_[o] = from_f(dw * wj);  // d/dlog_w = w d/dw
      da_[o] = from_f(da);
    }
  }

  float4* p = reinterpret_cast<float4*>(ds0 + ((int64_t)bh * N + me) * N);
#pragma unroll
  for (int q = 0; q < N / 4; ++q) p[q] = make_float4(G[4 * q], G[4 * q + 1], G[4 * q + 2], G[4 * q + 3]);
}

}  // namespace

cudaError_t vrwkv_wkv7_forward(int B, int T, int H, const void* r, const void* log_w, const void* k,
                               const void* v, const void* a, const void* b, const float* s0, void* y,
                               float* sT, float* ckpt, float* sa, cudaStream_t stream) {
  const dim3 grid(B * H), block(N);
  if (ckpt != nullptr) {
    wkv7_forward_kernel<true><<<grid, block, 0, stream>>>(
        T, H, (const F*)r, (const F*)log_w, (const F*)k, (const F*)v, (const F*)a, (const F*)b, s0, (F*)y, sT,
        ckpt, sa);
  } else {
    wkv7_forward_kernel<false><<<grid, block, 0, stream>>>(
        T, H, (const F*)r, (const F*)log_w, (const F*)k, (const F*)v, (const F*)a, (const F*)b, s0, (F*)y, sT,
        nullptr, nullptr);
  }
  return cudaGetLastError();
}

cudaError_t vrwkv_wkv7_backward(int B, int T, int H, const void* r, const void* log_w, const void* k,
                                const void* v, const void* a, const void* b, const void* dy,
                                const float* dsT, const float* ckpt, const float* sa, bool zero_s0, void* dr,
                                void* dlog_w, void* dk, void* dv, void* da, void* db, float* ds0,
                                cudaStream_t stream) {
  wkv7_backward_kernel<<<dim3(B * H), dim3(N), 0, stream>>>(
      T, H, (const F*)r, (const F*)log_w, (const F*)k, (const F*)v, (const F*)a, (const F*)b, (const F*)dy, dsT,
      ckpt, sa, int(zero_s0), (F*)dr, (F*)dlog_w, (F*)dk, (F*)dv, (F*)da, (F*)db, ds0);
  return cudaGetLastError();
}
