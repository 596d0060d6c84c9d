// XLA FFI handler: a batch of float32 GEMMs, C[i] = op(A[i]) op(B[i]), row-major, on oneMKL's
// sequential `cblas_sgemm`, the work split across XLA's intra-op thread pool. Built and
// loaded by cpu_gemm.py (which says why and when it is used).
//
// A is [batch, m, k] (or [batch, k, m] with ta), B is [batch, k, n] (or [batch, n, k] with
// tb), C is [batch, m, n]. The work items are (batch element, slice of the longer of m and n);
// the calling thread and up to `threads - 1` pool tasks claim them from a shared counter, so
// a task the pool starts late finds nothing left and returns, and the caller only waits for
// items another thread is running (no deadlock when the pool is busy with other thunks).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k,
                            float alpha, const float* a, int lda, const float* b, int ldb,
                            float beta, float* c, int ldc);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Multiply-adds per item, below which waking a pool thread costs more than it saves (a
// 128 x 64 x 256 GEMM ran 30% slower split in two than whole, on a 2-core Xeon).
constexpr int64_t kMinItemMacs = int64_t{1} << 21;

using Batch = ffi::Buffer<ffi::F32, 3>;
using BatchOut = ffi::ResultBuffer<ffi::F32, 3>;

struct Work {
  std::atomic<int64_t> next{0};
  int64_t done = 0;   // under `mutex`
  std::mutex mutex;
  std::condition_variable finished;
};

ffi::Error Gemm(ffi::ThreadPool pool, Batch a, Batch b, BatchOut c, bool ta, bool tb) {
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t batch = cd[0], m = cd[1], n = cd[2], k = ta ? ad[1] : ad[2];
  if (ad[0] != batch || bd[0] != batch || (ta ? ad[2] : ad[1]) != m ||
      (tb ? bd[1] : bd[2]) != n || (tb ? bd[2] : bd[1]) != k) {
    return ffi::Error::InvalidArgument("cpu_gemm: operand shapes do not match the result");
  }
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  const int64_t lda = ad[2], ldb = bd[2];
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
    const float* Ai = A + i * ad[1] * ad[2];
    const float* Bi = B + i * bd[1] * bd[2];
    float* Ci = C + i * m * n;
    if (split_m) {
      cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, hi - lo, n, k,
                  1.f, ta ? Ai + lo : Ai + lo * lda, lda, Bi, ldb, 0.f, Ci + lo * n, n);
    } else {
      cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, hi - lo, k,
                  1.f, Ai, lda, tb ? Bi + lo * ldb : Bi + lo, ldb, 0.f, Ci + lo, n);
    }
  };
  if (items == 1) {
    run(0);
    return ffi::Error::Success();
  }
  auto work = std::make_shared<Work>();
  auto claim = [=]() {
    for (int64_t item; (item = work->next.fetch_add(1)) < items;) {
      run(item);
      std::lock_guard<std::mutex> lock(work->mutex);
      if (++work->done == items) work->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, items); ++t) pool.Schedule([claim] { claim(); });
  claim();
  // Sleeps (instead of spinning) until the items other threads are running are done: on a
  // 2-core host the input pipeline's threads need the core meanwhile.
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done == items; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrivlmCpuGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Batch>()
                                  .Arg<Batch>()
                                  .Ret<Batch>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));
