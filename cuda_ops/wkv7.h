// WKV-7 CUDA kernels: host launchers shared by wkv7.cu (kernels) and wkv7_op.cpp (torch op).
//
// One build fixes the element type and sizes through macros set by vrwkv_core/kernels/cuda.py:
//   VRWKV_BF16 (1: bfloat16 inputs/outputs, 0: float32), VRWKV_N (head size), VRWKV_C (chunk
//   length between state checkpoints), VRWKV_NS (the torch op namespace of this build).
// All [B,T,H,N] tensors are contiguous; states are float32 [B,H,N,N] with rows indexing v.
#pragma once

#include <cuda_runtime.h>

#ifndef VRWKV_BF16
#define VRWKV_BF16 1
#endif
#ifndef VRWKV_N
#define VRWKV_N 64
#endif
#ifndef VRWKV_C
#define VRWKV_C 16
#endif

// Inputs r, log_w, k, v, a, b and output y have the build's element type (passed as void*).
// s0 may be null (zero initial state); ckpt/sa are null when nothing is saved for backward,
// otherwise ckpt is [B*H, ceil(T/C), N, N] (transposed: [.., k index, v index]) and
// sa is [B,T,H,N] float32 (S_{t-1} a_t).
cudaError_t vrwkv_wkv7_forward(int B, int T, int H, const void* r, const void* log_w, const void* k,
                               const void* v, const void* a, const void* b, const float* s0, void* y,
                               float* sT, float* ckpt, float* sa, cudaStream_t stream);

// dsT may be null (no gradient on the final state); zero_s0 says the forward started from a zero
// state (no s0), which the backward then uses exactly instead of rebuilding it. Gradients have the element type, except
// ds0 (float32 [B,H,N,N]).
cudaError_t vrwkv_wkv7_backward(int B, int T, int H, const void* r, const void* log_w, const void* k,
                                const void* v, const void* a, const void* b, const void* dy,
                                const float* dsT, const float* ckpt, const float* sa, bool zero_s0, void* dr,
                                void* dlog_w, void* dk, void* dv, void* da, void* db, float* ds0,
                                cudaStream_t stream);
