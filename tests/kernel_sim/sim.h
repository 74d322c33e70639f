// Host simulation of CUDA blocks: one std::thread per CUDA thread, barriers for __syncthreads and warp shuffles.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <thread>
#include <vector>
#include <cmath>
#include <memory>
struct SimDim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local SimDim3 threadIdx, blockIdx;
inline SimDim3 blockDim, gridDim;
inline std::barrier<>* g_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp;
inline float g_shfl[1024];
#undef __shared__
#define __shared__ static
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  int tid = threadIdx.x + threadIdx.y * blockDim.x;
  g_shfl[tid] = v;
  g_warp[tid / 32]->arrive_and_wait();
  float r = g_shfl[(tid & ~31) | ((tid & 31) ^ o)];
  g_warp[tid / 32]->arrive_and_wait();
  return r;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
template <class F> void sim_launch(SimDim3 grid, SimDim3 block, F f) {
  blockDim = block; gridDim = grid;
  int n = block.x * block.y;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(n); g_bar = &bar;
      g_warp.clear();
      for (int w = 0; w < n / 32; ++w) g_warp.emplace_back(new std::barrier<>(32));
      std::vector<std::thread> ts;
      for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx)
          ts.emplace_back([=] { threadIdx = {tx, ty, 0}; blockIdx = {bx, by, 0}; f(); });
      for (auto& t : ts) t.join();
    }
}
