// XLA FFI handlers for float32 and bfloat16-input GEMMs on the CPU, built and loaded by
// cpu_gemm.py (which says why and when each is used); the work is split across XLA's intra-op
// thread pool.
//
// DrivlmCpuGemm: a batch of GEMMs, C[i] = op(A[i]) op(B[i]), row-major, on oneMKL's sequential
// `cblas_sgemm`. A is [batch, m, k] (or [batch, k, m] with ta), B is [batch, k, n] (or
// [batch, n, k] with tb), C is [batch, m, n], in memory: the buffers come in the einsum's own
// shapes (any rank) and the sizes as attributes, so XLA sees no reshape between an operand's
// producer and this call. The work items are (batch element, slice of the longer of m and n).
// DrivlmCpuGemmBf16: the same for bfloat16 A and B (MKL's `cblas_gemm_bf16bf16f32`, AMX where
// the CPU has it), C still float32.
//
// DrivlmCpuGemmPacked: C [m, n] = A [m, k] B for a constant B that cpu_gemm.pack laid out as
// [ceil(n / 32), k, 32] (32-column panels, zero-padded), once, while tracing. Each call then
// streams B in the order it is used (no per-call packing of the weight, which is what MKL's
// plain sgemm does and what makes it slow on a few rows: the pruned student's 50-row GEMMs on
// weights read from memory each call). AVX-512 only; the work items are runs of panels.
//
// In all, the calling thread and up to `threads - 1` pool tasks claim work items from a
// shared counter, so a task the pool starts late finds nothing left and returns, and the
// caller only waits for items another thread is running (no deadlock when the pool is busy
// with other thunks).
#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <immintrin.h>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k,
                            float alpha, const float* a, int lda, const float* b, int ldb,
                            float beta, float* c, int ldc);
// bfloat16 operands (MKL_BF16: the raw 16 bits), float32 accumulation and result.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n,
                                       int k, float alpha, const uint16_t* a, int lda,
                                       const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Multiply-adds per item, below which waking a pool thread costs more than it saves (a
// 128 x 64 x 256 GEMM ran 30% slower split in two than whole, on a 2-core Xeon).
constexpr int64_t kMinItemMacs = int64_t{1} << 21;

using Batch = ffi::Buffer<ffi::F32, 3>;

struct Work {
  std::function<void(int64_t)> run;
  int64_t items;
  std::atomic<int64_t> next{0};
  int64_t done = 0;   // under `mutex`
  std::mutex mutex;
  std::condition_variable finished;
};

// Runs `run(0 .. items - 1)` on the calling thread and up to `threads - 1` pool tasks.
void ParallelFor(ffi::ThreadPool& pool, int64_t threads, int64_t items,
                 const std::function<void(int64_t)>& run) {
  if (items == 1) {
    run(0);
    return;
  }
  auto work = std::make_shared<Work>();
  work->run = run;
  work->items = items;
  auto claim = [work]() {
    for (int64_t item; (item = work->next.fetch_add(1)) < work->items;) {
      work->run(item);
      std::lock_guard<std::mutex> lock(work->mutex);
      if (++work->done == work->items) work->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, items); ++t) pool.Schedule([claim] { claim(); });
  claim();
  // Sleeps (instead of spinning) until the items other threads are running are done: on a
  // 2-core host the input pipeline's threads need the core meanwhile.
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done == items; });
}

template <ffi::DataType T>
ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<T> a, ffi::Buffer<T> b,
                ffi::ResultBuffer<ffi::F32> c, int64_t batch, int64_t m, int64_t n, int64_t k,
                bool ta, bool tb) {
  // The sizes come from cpu_gemm.einsum (its only caller); the buffers' sizes must agree.
  if (a.element_count() != static_cast<size_t>(batch * m * k) ||
      b.element_count() != static_cast<size_t>(batch * k * n) ||
      c->element_count() != static_cast<size_t>(batch * m * n)) {
    return ffi::Error::InvalidArgument("cpu_gemm: operand sizes do not match the GEMM's");
  }
  static_assert(T == ffi::DataType::F32 || T == ffi::DataType::BF16);
  using In = std::conditional_t<T == ffi::DataType::F32, float, uint16_t>;
  constexpr auto cblas = [](auto... args) {
    if constexpr (T == ffi::DataType::F32) {
      cblas_sgemm(args...);
    } else {
      cblas_gemm_bf16bf16f32(args...);
    }
  };
  const In* A = static_cast<const In*>(a.untyped_data());
  const In* B = static_cast<const In*>(b.untyped_data());
  float* C = c->typed_data();
  const int64_t lda = ta ? m : k, ldb = tb ? k : n;
  const bool split_m = m >= n;
  const int64_t length = split_m ? m : n;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t slices = std::clamp<int64_t>(
      (threads + batch - 1) / batch, 1,
      std::max<int64_t>(1, std::min(length, m * n * k / kMinItemMacs)));
  const int64_t items = batch * slices;

  auto run = [=](int64_t item) {
    const int64_t i = item / slices, s = item % slices;
    const int64_t lo = length * s / slices, hi = length * (s + 1) / slices;
    const In* Ai = A + i * m * k;
    const In* Bi = B + i * k * n;
    float* Ci = C + i * m * n;
    const int op_a = ta ? kTrans : kNoTrans, op_b = tb ? kTrans : kNoTrans;
    if (split_m) {
      cblas(kRowMajor, op_a, op_b, int(hi - lo), int(n), int(k), 1.f,
            ta ? Ai + lo : Ai + lo * lda, int(lda), Bi, int(ldb), 0.f, Ci + lo * n, int(n));
    } else {
      cblas(kRowMajor, op_a, op_b, int(m), int(hi - lo), int(k), 1.f, Ai, int(lda),
            tb ? Bi + lo * ldb : Bi + lo, int(ldb), 0.f, Ci + lo, int(n));
    }
  };
  ParallelFor(pool, threads, items, run);
  return ffi::Error::Success();
}

// The packed-weight GEMM. Rows are taken in chunks of up to kChunkRows (the weight streams
// past each chunk once), each chunk in register tiles of up to kTileRows rows x 32 columns (28
// accumulators, A's elements broadcast from its rows in place); depth in blocks of kDepth (a
// 24 KB slice of a panel, reused from L1 by every tile of the chunk). While a slice is in use, its tiles prefetch the next one into L2, a share
// each, so reading the weight from memory overlaps the arithmetic. In jit, 12 layers of a
// ViT-B MLP (768 -> 3072 -> 768, weights read from memory), 2-core Xeon, GFLOP/s ours / MKL's
// sgemm / XLA's dots: 50 rows 231 / 166 / 119, 197 rows 278 / 287 / 252 (`python -m
// experiments.bench_gemm`, 2026-12-05; packing A's tiles first, as MKL does, cost more than
// it saved).
constexpr int kPanel = 32, kTileRows = 14, kDepth = 192, kChunkRows = 256;

// C[r, :] (+)= A[r, :kc] Bp for the r < R rows of one tile: row r of A at a + r * lda, `bp` a
// [kc][32] slice of a panel; the masks `lo` and `hi` keep the last panel's real columns.
// Prefetches `lines` cache lines from `next`.
template <int R>
__attribute__((target("avx512f"))) void Tile(int64_t kc, const float* a, int64_t lda,
                                             const float* bp, float* c, int64_t ldc,
                                             bool accumulate, __mmask16 lo, __mmask16 hi,
                                             const float* next, int64_t lines) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = accumulate ? _mm512_maskz_loadu_ps(lo, c + r * ldc) : _mm512_setzero_ps();
    c1[r] = accumulate ? _mm512_maskz_loadu_ps(hi, c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k, ++a, bp += kPanel) {
    const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda]);
      c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
    }
    // Up to two lines a step: a chunk of one tile prefetches the whole next slice (2 kc lines).
    if (k < lines) _mm_prefetch(reinterpret_cast<const char*>(next + 16 * k), _MM_HINT_T1);
    if (k + kc < lines) {
      _mm_prefetch(reinterpret_cast<const char*>(next + 16 * (k + kc)), _MM_HINT_T1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, lo, c0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, hi, c1[r]);
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, bool,
                        __mmask16, __mmask16, const float*, int64_t);
template <int... R>
constexpr std::array<TileFn, sizeof...(R)> MakeTiles(std::integer_sequence<int, R...>) {
  return {Tile<R + 1>...};
}
constexpr auto kTiles = MakeTiles(std::make_integer_sequence<int, kTileRows>());

// C[r0:r1, panels p0:p1] = A[r0:r1] Bp, A [m, k] and C [m, n] row-major.
void PackedChunk(const float* A, const float* Bp, float* C, int64_t r0, int64_t r1, int64_t k,
                 int64_t n, int64_t p0, int64_t p1) {
  const int64_t rows = r1 - r0, tiles = (rows + kTileRows - 1) / kTileRows;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min<int64_t>(kPanel, n - p * kPanel);
    const __mmask16 lo = cols >= 16 ? 0xFFFF : (1u << cols) - 1;
    const __mmask16 hi = cols <= 16 ? 0 : cols >= 32 ? 0xFFFF : (1u << (cols - 16)) - 1;
    for (int64_t kb = 0; kb < k; kb += kDepth) {
      const int64_t kc = std::min<int64_t>(kDepth, k - kb);
      const float* slice = Bp + (p * k + kb) * kPanel;
      // The next slice (of this panel or the next one) starts where this one ends; after the
      // item's last, the next row chunk starts again at panel p0. Its lines are shared out.
      const bool last = p + 1 == p1 && kb + kc == k;
      const float* next = last ? Bp + p0 * k * kPanel : slice + kc * kPanel;
      const int64_t lines = std::min<int64_t>(kDepth, kb + kc < k ? k - kb - kc : k) * kPanel / 16;
      const int64_t share = (lines + tiles - 1) / tiles;
      for (int64_t t = 0; t < tiles; ++t) {   // tiles of near-equal height
        const int64_t t0 = r0 + rows * t / tiles, t1 = r0 + rows * (t + 1) / tiles;
        kTiles[t1 - t0 - 1](kc, A + t0 * k + kb, k, slice, C + t0 * n + p * kPanel, n, kb > 0,
                            lo, hi, next + t * share * 16,
                            std::max<int64_t>(0, std::min(share, lines - t * share)));
      }
    }
  }
}

using Matrix = ffi::Buffer<ffi::F32, 2>;

ffi::Error PackedGemm(ffi::ThreadPool pool, Matrix a, Batch bp, ffi::ResultBuffer<ffi::F32, 2> c) {
  if (!__builtin_cpu_supports("avx512f")) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "cpu_gemm: the packed GEMM needs AVX-512F");
  }
  const auto ad = a.dimensions(), bd = bp.dimensions(), cd = c->dimensions();
  const int64_t m = cd[0], n = cd[1], k = ad[1], panels = (n + kPanel - 1) / kPanel;
  if (ad[0] != m || bd[0] != panels || bd[1] != k || bd[2] != kPanel) {
    return ffi::Error::InvalidArgument("cpu_gemm: packed operand shapes do not match the result");
  }
  const float* A = a.typed_data();
  const float* Bp = bp.typed_data();
  float* C = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(C, C + m * n, 0.f);
    return ffi::Error::Success();
  }
  const int64_t chunks = (m + kChunkRows - 1) / kChunkRows;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t items =
      std::clamp<int64_t>(std::min(threads, m * n * k / kMinItemMacs), 1, panels);
  ParallelFor(pool, threads, items, [=](int64_t item) {
    const int64_t p0 = panels * item / items, p1 = panels * (item + 1) / items;
    for (int64_t i = 0; i < chunks; ++i) {
      PackedChunk(A, Bp, C, m * i / chunks, m * (i + 1) / chunks, k, n, p0, p1);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define DRIVLM_GEMM_HANDLER(name, dtype)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Gemm<dtype>,                        \
                                ffi::Ffi::Bind()                          \
                                    .Ctx<ffi::ThreadPool>()               \
                                    .Arg<ffi::Buffer<dtype>>()            \
                                    .Arg<ffi::Buffer<dtype>>()            \
                                    .Ret<ffi::Buffer<ffi::F32>>()         \
                                    .Attr<int64_t>("batch")               \
                                    .Attr<int64_t>("m")                   \
                                    .Attr<int64_t>("n")                   \
                                    .Attr<int64_t>("k")                   \
                                    .Attr<bool>("ta")                     \
                                    .Attr<bool>("tb"));

DRIVLM_GEMM_HANDLER(DrivlmCpuGemm, ffi::F32)
DRIVLM_GEMM_HANDLER(DrivlmCpuGemmBf16, ffi::BF16)

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrivlmCpuGemmPacked, PackedGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Batch>()
                                  .Ret<Matrix>());
