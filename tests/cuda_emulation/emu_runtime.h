// A CPU emulation of the small part of CUDA that shammie's kernels use, so that their logic (index
// math, tails, shared-memory staging, warp shuffles, barriers) can be run and checked on a machine
// without a GPU. rewrite.py turns each .cu/.cuh into plain C++ that includes this header.
//
// Model: the blocks of a launch run one after another on the calling thread. Within a block every
// CUDA thread is a ucontext coroutine with its own stack; a thread runs until it reaches a barrier
// (__syncthreads, __syncwarp, a shuffle) or returns, and the scheduler releases a barrier once every
// thread of its block (or warp) that has not returned is waiting there. Anything else (a thread at
// __syncthreads while a warp-mate waits in a shuffle, a shuffle that reads a returned lane) is a bug
// on a real GPU too, and is reported as an error naming the block and threads.
//
// Not modelled: concurrency between blocks (so no inter-block races), memory ordering, timing. Races
// within a block, and sums across blocks whose order matters (float atomics), show as results that
// change with SHAMMIE_EMU_THREAD_ORDER=reverse.
// Dynamic shared memory and the static __shared__ arrays are filled with 0xFF bytes (NaN for floats)
// at the start of every block, so a kernel that reads shared memory it did not write shows it.
#pragma once

#include <ucontext.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <functional>
#include <limits>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __noinline__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// The coordinates of the CUDA thread that is running now; the scheduler sets them before resuming it.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

namespace emu {

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Lane {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::kNone;
  uint64_t sent = 0;      // this lane's value in the pending shuffle
  int source = -1;        // the lane it reads
  uint32_t mask = 0;      // the lanes taking part in it
  uint64_t received = 0;  // what it gets, filled when the shuffle completes
};

struct BlockState {
  std::vector<Lane> lanes;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  std::exception_ptr error;
  std::vector<unsigned char> dynamic_smem;
  std::set<const void*> poisoned;   // static __shared__ arrays already filled in this block
  size_t stack_bytes = 256 << 10;
  bool reverse = false;   // SHAMMIE_EMU_THREAD_ORDER=reverse, read once per launch
};

inline BlockState*& state() {
  static BlockState* s = nullptr;
  return s;
}

[[noreturn]] inline void fail(const std::string& what) {
  std::ostringstream m;
  m << "CUDA emulation: " << what << " (block " << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z
    << ", thread " << threadIdx.x << "," << threadIdx.y << "," << threadIdx.z << ")";
  throw std::runtime_error(m.str());
}

inline int linear_thread() { return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

inline int lane_id() { return linear_thread() % 32; }

inline void set_thread(int i) {
  threadIdx.x = unsigned(i) % blockDim.x;
  threadIdx.y = (unsigned(i) / blockDim.x) % blockDim.y;
  threadIdx.z = unsigned(i) / (blockDim.x * blockDim.y);
}

// Called by a CUDA thread: park at a barrier and give control back to the scheduler.
inline void park(Wait w) {
  BlockState& s = *state();
  Lane& lane = s.lanes[size_t(s.current)];
  lane.wait = w;
  swapcontext(&lane.context, &s.scheduler);
}

inline void trampoline() {
  BlockState& s = *state();
  try {
    s.body();
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
  }
  s.lanes[size_t(s.current)].wait = Wait::kDone;
  swapcontext(&s.lanes[size_t(s.current)].context, &s.scheduler);
}

// Completes the warp-level operations (shuffles, __syncwarp) of lanes lo .. hi − 1 whose participants
// (the lanes of their mask that have not returned) all wait in one with the same mask.
inline bool release_warp(BlockState& s, int lo, int hi) {
  bool released = false;
  for (int i = lo; i < hi; ++i) {
    const Lane& first = s.lanes[size_t(i)];
    if (first.wait != Wait::kWarp) continue;
    const uint32_t mask = first.mask;
    bool complete = true;
    for (int j = lo; j < hi && complete; ++j) {
      if (!(mask >> (j - lo) & 1u)) continue;
      const Lane& other = s.lanes[size_t(j)];
      complete = other.wait == Wait::kDone || (other.wait == Wait::kWarp && other.mask == mask);
    }
    if (!complete) continue;
    for (int j = lo; j < hi; ++j) {
      Lane& lane = s.lanes[size_t(j)];
      if (!(mask >> (j - lo) & 1u) || lane.wait != Wait::kWarp) continue;
      if (lane.source >= 0) {
        const Lane& from = s.lanes[size_t(lo + lane.source)];
        if (lo + lane.source >= hi || !(mask >> lane.source & 1u) || from.wait != Wait::kWarp) {
          set_thread(j);
          fail("a shuffle reads lane " + std::to_string(lane.source) + ", which is not taking part (mask " +
               std::to_string(mask) + ") or has returned");
        }
        lane.received = from.sent;
      }
    }
    for (int j = lo; j < hi; ++j)   // after every lane has read: the sources are still parked above
      if (mask >> (j - lo) & 1u && s.lanes[size_t(j)].wait == Wait::kWarp) s.lanes[size_t(j)].wait = Wait::kNone;
    released = true;
  }
  return released;
}

// SHAMMIE_EMU_THREAD_ORDER=reverse runs the blocks of a launch, and the threads between two barriers,
// from the last to the first. A kernel whose result changes with the order has a shared- or
// global-memory race, or sums in an order that is not fixed. Read at every launch, so that a test can
// run one kernel both ways.
inline bool thread_order_reversed() {
  const char* v = std::getenv("SHAMMIE_EMU_THREAD_ORDER");
  return v && std::string(v) == "reverse";
}

// Runs one block to completion; throws on a deadlock or on an error inside the block.
inline void run_block(BlockState& s, int threads) {
  s.lanes.resize(size_t(threads));
  for (int i = 0; i < threads; ++i) {
    Lane& lane = s.lanes[size_t(i)];
    if (!lane.stack) lane.stack.reset(new char[s.stack_bytes]);
    lane.wait = Wait::kNone;
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = lane.stack.get();
    lane.context.uc_stack.ss_size = s.stack_bytes;
    lane.context.uc_link = nullptr;
    makecontext(&lane.context, trampoline, 0);
  }
  const int warps = (threads + 31) / 32;
  const bool reverse = s.reverse;
  for (;;) {
    for (int k = 0; k < threads; ++k) {
      const int i = reverse ? threads - 1 - k : k;
      if (s.lanes[size_t(i)].wait != Wait::kNone) continue;
      s.current = i;
      set_thread(i);
      swapcontext(&s.scheduler, &s.lanes[size_t(i)].context);
      if (s.error) std::rethrow_exception(s.error);
    }
    // Everyone is parked or done: release what can be released.
    bool released = false, all_done = true;
    for (int w = 0; w < warps; ++w) released |= release_warp(s, 32 * w, std::min(threads, 32 * w + 32));
    if (released) continue;
    bool any_block = false, all_block = true;
    for (int i = 0; i < threads; ++i) {
      const Wait wt = s.lanes[size_t(i)].wait;
      if (wt != Wait::kDone) all_done = false;
      if (wt == Wait::kBlock) any_block = true;
      else if (wt != Wait::kDone) all_block = false;
    }
    if (all_done) return;
    if (any_block && all_block) {
      for (auto& lane : s.lanes)
        if (lane.wait == Wait::kBlock) lane.wait = Wait::kNone;
      continue;
    }
    std::ostringstream m;
    m << "deadlock: threads wait at different barriers:";
    for (int i = 0; i < threads; ++i) {
      const Wait wt = s.lanes[size_t(i)].wait;
      if (wt == Wait::kBlock) m << " " << i << ":syncthreads";
      else if (wt == Wait::kWarp) m << " " << i << ":warp";
    }
    set_thread(0);
    fail(m.str());
  }
}

struct Config {
  dim3 grid, block;
  size_t smem = 0;
};

inline dim3 as_dim3(dim3 d) { return d; }
template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
dim3 as_dim3(I n) {
  if (n < 0 || uint64_t(n) > std::numeric_limits<unsigned>::max()) throw std::runtime_error("CUDA emulation: bad grid/block size");
  return dim3(unsigned(n));
}

template <typename G, typename B>
Config config(G grid, B block) { return {as_dim3(grid), as_dim3(block), 0}; }
template <typename G, typename B, typename S>
Config config(G grid, B block, S smem) { return {as_dim3(grid), as_dim3(block), size_t(smem)}; }
template <typename G, typename B, typename S, typename Stream>
Config config(G grid, B block, S smem, Stream) { return {as_dim3(grid), as_dim3(block), size_t(smem)}; }

// kernel<<<grid, block, smem, stream>>>(args...) becomes launch(config(...), [](auto&... a) { kernel(a...); },
// args...): the arguments are evaluated once, as a launch copies them, and every thread of every block
// calls the kernel on its own copy.
template <typename F, typename... A>
void launch(Config c, F&& call, A&&... args) {
  const std::tuple<std::decay_t<A>...> params(std::forward<A>(args)...);
  const int threads = int(c.block.x * c.block.y * c.block.z);
  if (threads <= 0 || threads > 1024) throw std::runtime_error("CUDA emulation: " + std::to_string(threads) + " threads per block");
  if (c.smem > (size_t(227) << 10)) throw std::runtime_error("CUDA emulation: " + std::to_string(c.smem) + " bytes of dynamic shared memory");
  const uint64_t blocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  if (blocks == 0) throw std::runtime_error("CUDA emulation: empty grid (invalid configuration on a GPU)");
  BlockState s;
  s.body = [&] {
    auto own = params;
    std::apply(call, own);
  };
  // What a launch changes, put back however it ends (a kernel error propagates as an exception).
  struct Restore {
    BlockState* state_before = state();
    dim3 grid_before = gridDim, block_before = blockDim;
    ~Restore() {
      state() = state_before;
      gridDim = grid_before;
      blockDim = block_before;
    }
  } restore;
  state() = &s;
  gridDim = c.grid;
  blockDim = c.block;
  s.reverse = thread_order_reversed();
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = s.reverse ? blocks - 1 - k : k;
    blockIdx = dim3(unsigned(b % c.grid.x), unsigned((b / c.grid.x) % c.grid.y), unsigned(b / (uint64_t(c.grid.x) * c.grid.y)));
    s.dynamic_smem.assign(c.smem + 16, 0xFF);
    s.poisoned.clear();
    run_block(s, threads);
  }
}

inline unsigned char* dynamic_shared() {
  auto& buf = state()->dynamic_smem;
  auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

// First use of a static __shared__ array in this block: fill it with 0xFF.
inline void poison_shared(const void* p, size_t bytes) {
  if (state()->poisoned.insert(p).second) std::memset(const_cast<void*>(p), 0xFF, bytes);
}

template <typename T>
T shuffle(T v, int source_in_warp, uint32_t mask) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  BlockState& s = *state();
  Lane& lane = s.lanes[size_t(s.current)];
  lane.sent = 0;
  std::memcpy(&lane.sent, &v, sizeof(T));
  lane.source = source_in_warp;
  lane.mask = mask;
  if (!(mask >> lane_id() & 1u)) fail("a warp operation whose mask leaves out the calling lane");
  park(Wait::kWarp);   // the lanes never move: `lane` is still this thread's
  lane.source = -1;
  T out;
  std::memcpy(&out, &lane.received, sizeof(T));
  return out;
}

}  // namespace emu

inline void __syncthreads() { emu::park(emu::Wait::kBlock); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::shuffle<int>(0, -1, mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = emu::lane_id(), end = (lane / width + 1) * width;
  int src = lane ^ lane_mask;
  if (src >= end) src = lane;
  return emu::shuffle(v, src, mask);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = emu::lane_id(), end = (lane / width + 1) * width;
  int src = lane + int(delta);
  if (src >= end) src = lane;
  return emu::shuffle(v, src, mask);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = emu::lane_id(), begin = (lane / width) * width;
  int src = lane - int(delta);
  if (src < begin) src = lane;
  return emu::shuffle(v, src, mask);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = emu::lane_id();
  return emu::shuffle(v, (lane / width) * width + ((src_lane % width) + width) % width, mask);
}

// Blocks run one at a time and threads switch only at barriers: a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}

// ---- the CUDA runtime and c10::cuda pieces the host code calls ----
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaFuncAttributes { size_t sharedSizeBytes = 0; };
struct cudaDeviceProp {
  int multiProcessorCount = 4;   // few blocks per launch: more work per block, quicker emulation
  size_t sharedMemPerBlock = 48 << 10;
  size_t sharedMemPerBlockOptin = 227 << 10;
  int major = 9, minor = 0;
};
// SHAMMIE_EMU_SMEM_OPTIN=<bytes> lowers the shared memory a block may opt in to (227 KiB, an H100's), to
// exercise the paths for smaller GPUs.
inline cudaDeviceProp& emu_device() {
  static cudaDeviceProp p = [] {
    cudaDeviceProp d;
    if (const char* v = std::getenv("SHAMMIE_EMU_SMEM_OPTIN")) d.sharedMemPerBlockOptin = std::stoul(v);
    return d;
  }();
  return p;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu_device().multiProcessorCount : int(emu_device().sharedMemPerBlockOptin);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, K) {
  *a = {};
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }

#define C10_CUDA_CHECK(expr) \
  do { (void)(expr); } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do { } while (0)

namespace c10::cuda {
struct CUDAGuard {
  template <typename D>
  explicit CUDAGuard(D) {}
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
enum class CaptureStatus { None, Active };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }
}  // namespace c10::cuda
namespace at::cuda {
using c10::cuda::getCurrentCUDAStream;
inline cudaDeviceProp* getCurrentDeviceProperties() { return &emu_device(); }
}  // namespace at::cuda

// ---- half types and wmma: every lane holds the whole 16×16 tile (fragments are opaque to the code) ----
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[rows * cols];
  static constexpr int num_elements = rows * cols;
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  for (auto& e : f.x) e = float(v);
}
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  const bool col = std::is_same_v<L, col_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = float(col ? p[c * ldm + r] : p[r * ldm + c]);
  __syncwarp();
}
template <int M, int N, int K, typename T, typename P>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const P* p, unsigned ldm, layout_t l) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = float(l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]);
  __syncwarp();
}
template <int M, int N, int K, typename T, typename P>
void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = P(f.x[r * N + c]);
  __syncwarp();
}
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
  __syncwarp();
}
}  // namespace nvcuda::wmma

namespace cuda::std {
using ::std::numeric_limits;
}
