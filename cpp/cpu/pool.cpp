// The CPU backend's thread pool (see pool.h).
#include "cpu/pool.h"

#include "threads.h"

#include <algorithm>
#include <chrono>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mambart {
namespace cpu {
namespace {

constexpr int kSpinMicros = 50;        // an idle worker spins this long before it sleeps
constexpr int64_t kChunksPerThread = 8; // a job is split into up to threads * this many chunks
constexpr int kEpochBits = 24, kCountBits = 20;
constexpr uint64_t kCountMask = (uint64_t(1) << kCountBits) - 1;
constexpr uint32_t kEpochMask = (uint32_t(1) << kEpochBits) - 1;
// The straggler guard (pool.h): a window of this many parallel jobs; serial once the caller's
// waits reach this share of it; serial periods from kSerialMinNs doubling to kSerialMaxNs.
constexpr int kWindowJobs = 64;
constexpr double kWaitShare = 0.25;
constexpr int64_t kSerialMinNs = 100'000'000, kSerialMaxNs = 3'200'000'000;

inline int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

uint64_t pack(uint32_t epoch, uint64_t chunks, uint64_t next) {
    return (uint64_t(epoch & kEpochMask) << (2 * kCountBits)) | (chunks << kCountBits) | next;
}

thread_local ThreadPool* tl_pool = nullptr;
thread_local bool tl_in_job = false;  // inside a chunk: nested loops run serially

inline void cpu_relax() {
#if defined(__x86_64__)
    _mm_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Flush-to-zero and denormals-are-zero for the scope, the previous MXCSR restored after.
class DenormalsOff {
 public:
    DenormalsOff() {
#if defined(__x86_64__)
        saved_ = _mm_getcsr();
        _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
    }
    ~DenormalsOff() {
#if defined(__x86_64__)
        _mm_setcsr(saved_);
#endif
    }

 private:
    unsigned saved_ = 0;
};

}  // namespace

int affinity_cores() {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n >= 1) return n;
    }
#endif
    const unsigned h = std::thread::hardware_concurrency();
    return h >= 1 ? int(h) : 1;
}

ThreadPool* current_pool() { return tl_pool; }

PoolScope::PoolScope(ThreadPool* p) : prev_(tl_pool) { tl_pool = p; }
PoolScope::~PoolScope() { tl_pool = prev_; }

// The workers start with the first parallel job (run()), not here: a backend that never runs
// one (a model load that fails, a backend made to be inspected) starts no thread.
ThreadPool::ThreadPool(int threads) : threads_(std::max(1, threads)) {}

ThreadPool::~ThreadPool() {
    stop_.store(true);
    epoch_.fetch_add(1);
    {
        std::lock_guard<std::mutex> lk(mu_);
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
}

void ThreadPool::worker_loop() {
#if defined(__x86_64__)
    _mm_setcsr(_mm_getcsr() | 0x8040u);  // this thread only ever runs pool chunks
#endif
    tl_in_job = true;
    uint32_t seen = 0;  // the epoch at construction (not read here: the pool may be stopping)
    for (;;) {
        // Wait for a new epoch: spin a little (the next op of a decode step comes within
        // microseconds), then sleep.
        const auto t0 = std::chrono::steady_clock::now();
        int spins = 0;
        while (epoch_.load(std::memory_order_acquire) == seen && !stop_.load()) {
            cpu_relax();
            if (++spins % 64 == 0 &&
                std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(kSpinMicros)) {
                std::unique_lock<std::mutex> lk(mu_);
                sleepers_.fetch_add(1);
                while (epoch_.load() == seen && !stop_.load()) cv_.wait(lk);
                sleepers_.fetch_sub(1);
                break;
            }
        }
        if (stop_.load()) return;
        seen = epoch_.load(std::memory_order_acquire);
        work(seen);
    }
}

void ThreadPool::work(uint32_t epoch) {
    const uint32_t e = epoch & kEpochMask;
    uint64_t v = claim_.load(std::memory_order_acquire);
    for (;;) {
        const uint64_t chunks = (v >> kCountBits) & kCountMask, next = v & kCountMask;
        if (uint32_t(v >> (2 * kCountBits)) != e || next >= chunks) return;
        if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel,
                                          std::memory_order_acquire))
            continue;
        // Chunk `next` of this job is ours: the job stays as published until we report it.
        const int64_t n = n_;
        const int64_t b = int64_t(next) * n / int64_t(chunks);
        const int64_t end = int64_t(next + 1) * n / int64_t(chunks);
        fn_(ctx_, b, end);
        done_.fetch_add(1, std::memory_order_acq_rel);
        v = claim_.load(std::memory_order_acquire);
    }
}

void ThreadPool::run(int64_t n, int64_t grain, ChunkFn fn, void* ctx) {
    DenormalsOff denormals_off;
    grain = std::max<int64_t>(1, grain);
    const int64_t max_chunks = std::min<int64_t>(int64_t(threads_) * kChunksPerThread, int64_t(kCountMask));
    const int64_t chunks = std::min(max_chunks, n / grain);
    if (threads_ == 1 || chunks < 2 || tl_in_job) {
        fn(ctx, 0, n);
        return;
    }
    std::unique_lock<std::mutex> lk(busy_, std::try_to_lock);
    if (!lk.owns_lock()) {  // another thread's job is running: this one runs here
        fn(ctx, 0, n);
        return;
    }
    if (serial_until_ns_ != 0) {  // the straggler guard's serial period
        if (now_ns() < serial_until_ns_) {
            serial_jobs_.fetch_add(1, std::memory_order_relaxed);
            fn(ctx, 0, n);
            return;
        }
        serial_until_ns_ = 0;  // over: a new window measures the threads again
        window_jobs_ = 0;
    }
    if (window_jobs_ == 0) {
        window_start_ns_ = now_ns();
        window_wait_ns_ = 0;
    }
    if (workers_.empty()) {  // the first job: start the workers (epoch_ is still 0, as they expect)
        workers_.reserve(size_t(threads_ - 1));
        for (int i = 1; i < threads_; ++i) workers_.push_back(start_runtime_thread("mambart-cpu", [this] { worker_loop(); }));
    }
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    done_.store(0, std::memory_order_relaxed);
    const uint32_t e = epoch_.load() + 1;
    claim_.store(pack(e, uint64_t(chunks), 0), std::memory_order_release);
    epoch_.store(e);  // seq_cst, paired with the workers' sleepers_ increment
    if (sleepers_.load() > 0) {
        { std::lock_guard<std::mutex> g(mu_); }
        cv_.notify_all();
    }
    tl_in_job = true;
    work(e);
    tl_in_job = false;
    // Wait for chunks other threads claimed (never for a thread that claimed none).
    if (done_.load(std::memory_order_acquire) < chunks) {
        const int64_t t0 = now_ns();
        int spins = 0;
        while (done_.load(std::memory_order_acquire) < chunks) {
            if (++spins < 4096) cpu_relax();
            else std::this_thread::yield();
        }
        window_wait_ns_ += now_ns() - t0;
    }
    if (++window_jobs_ < kWindowJobs) return;
    const int64_t t = now_ns();
    window_jobs_ = 0;
    if (double(window_wait_ns_) > kWaitShare * double(t - window_start_ns_)) {
        serial_ns_ = serial_ns_ == 0 ? kSerialMinNs : std::min(2 * serial_ns_, kSerialMaxNs);
        serial_until_ns_ = t + serial_ns_;
    } else {
        serial_ns_ = 0;  // a clean window: the next stall starts from the shortest period
    }
}

}  // namespace cpu
}  // namespace mambart
