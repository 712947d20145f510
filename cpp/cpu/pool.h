// The CPU backend's thread pool: parallel loops that a busy core cannot stall.
//
// Why not OpenMP: libgomp's threads spin between parallel regions and every region ends in a
// barrier that all threads must reach. When another process takes a core, a spinning thread
// uses up its time slice and the scheduler no longer favours it on wake-up, and each of the
// ~100 regions of a decode step waits for it to be scheduled again: decode of a small model fell
// ~10x (issue 22). Here:
//   - the calling thread runs chunks too, and the work is split into several chunks per thread,
//     claimed one at a time from an atomic counter: a thread that is not running simply claims
//     fewer chunks; the caller waits only for chunks that were claimed, never for a thread that
//     has not woken up;
//   - idle workers spin for a short while (kSpinMicros), then sleep on a condition variable,
//     so between tokens they do not take a core from anyone;
//   - a straggler guard: the caller measures how long it waits, after its own share, for chunks
//     other threads claimed. When that exceeds a quarter of the wall time over a window of jobs
//     (a worker keeps being preempted mid-chunk: another process has its core), the pool runs
//     jobs on the caller alone for a while (100 ms, doubling while the stalls persist, at most
//     3.2 s), then tries its threads again: a busy core costs about the single-thread speed,
//     not a time slice per op (issue 22);
//   - every thread of a job (the caller included, its own MXCSR restored afterwards) runs with
//     flush-to-zero and denormals-are-zero on x86-64: denormal arithmetic is slow on many cores
//     (Intel: ~100x), and the runtime's results do not depend on values below 1e-38.
// A loop inside a chunk (nesting), or a second caller while the pool is busy, runs serially on
// the calling thread. The pool allocates nothing per job.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace mambart {
namespace cpu {

// The number of cores this process may run on (its CPU affinity; 1 if it cannot be read).
int affinity_cores();

class ThreadPool {
 public:
    // threads >= 1: the caller plus threads - 1 workers.
    explicit ThreadPool(int threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int threads() const { return threads_; }

    // Jobs the straggler guard ran on the caller alone (they would have gone to the pool).
    uint64_t serial_jobs() const { return serial_jobs_.load(std::memory_order_relaxed); }

    // Runs f(begin, end) over [0, n) split into chunks of at least `grain` items: on the pool
    // when n >= 2 * grain and it has more than one thread, else on the caller in one call.
    template <class F>
    void parallel_for(int64_t n, int64_t grain, F&& f) {
        if (n <= 0) return;
        run(n, grain, &call<F>, &f);
    }

 private:
    typedef void (*ChunkFn)(void* ctx, int64_t begin, int64_t end);
    template <class F>
    static void call(void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); }

    void run(int64_t n, int64_t grain, ChunkFn fn, void* ctx);
    void worker_loop();
    // Claims and runs chunks of the job of epoch `epoch` until none is left.
    void work(uint32_t epoch);

    const int threads_;
    std::vector<std::thread> workers_;
    std::mutex busy_;  // held by the caller of a job
    // The job: written by the caller before it publishes the epoch, read by a worker only
    // after it has claimed a chunk (the job cannot finish, so cannot change, before that).
    ChunkFn fn_ = nullptr;
    void* ctx_ = nullptr;
    int64_t n_ = 0;
    // (epoch: 24 bits | chunks: 20 bits | next chunk: 20 bits), claimed by compare-exchange so
    // a late worker cannot take a chunk of a later job.
    std::atomic<uint64_t> claim_{0};
    std::atomic<int64_t> done_{0};     // chunks of the current job finished
    std::atomic<uint32_t> epoch_{0};   // bumped once per job (and at shutdown)
    std::atomic<int> sleepers_{0};     // workers waiting on cv_
    std::atomic<bool> stop_{false};
    // The straggler guard (read and written only by the holder of busy_): the current window's
    // start, its jobs and the caller's waits in it; the end of a serial period and its length.
    int64_t window_start_ns_ = 0;
    int64_t window_wait_ns_ = 0;
    int window_jobs_ = 0;
    int64_t serial_until_ns_ = 0;
    int64_t serial_ns_ = 0;  // the next serial period (0: none yet)
    std::atomic<uint64_t> serial_jobs_{0};
    std::mutex mu_;
    std::condition_variable cv_;
};

// The pool the ops of this thread run on: set for the duration of a CPU backend op
// (PoolScope); nullptr (the default) runs parallel_for serially.
ThreadPool* current_pool();

class PoolScope {
 public:
    explicit PoolScope(ThreadPool* p);
    ~PoolScope();
    PoolScope(const PoolScope&) = delete;
    PoolScope& operator=(const PoolScope&) = delete;

 private:
    ThreadPool* prev_;
};

// parallel_for on the current pool (serially where there is none).
template <class F>
inline void parallel_for(int64_t n, int64_t grain, F&& f) {
    ThreadPool* p = current_pool();
    if (p) p->parallel_for(n, grain, std::forward<F>(f));
    else if (n > 0) f(int64_t(0), n);
}

// The current pool's thread count (1 where there is none).
inline int pool_threads() {
    ThreadPool* p = current_pool();
    return p ? p->threads() : 1;
}

}  // namespace cpu
}  // namespace mambart
