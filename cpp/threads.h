// Threads the runtime starts (the engine's loop, the CPU pool's workers).
#pragma once

#include <thread>
#include <utility>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <signal.h>
#endif

namespace mambart {

// std::thread(f) with the asynchronous signals blocked in the new thread (SIGINT, SIGTERM,
// SIGHUP, SIGUSR1, SIGALRM, SIGCHLD, SIGPIPE, ...; the synchronous SIGSEGV, SIGBUS, SIGFPE,
// SIGILL, SIGTRAP and SIGABRT stay open): a signal sent to the process then reaches one of the
// application's own threads, never a runtime thread in the middle of a kernel or a wait
// (Python runs its handlers on the main thread; a C service installs handlers for its own
// threads). The mask is set in the calling thread around the creation, so the new thread
// starts with it, and restored there.
// `name` (at most 15 characters) names the thread where the platform allows (Linux: top -H,
// gdb, /proc/PID/task/TID/comm).
template <class F>
std::thread start_runtime_thread(const char* name, F&& f) {
    auto run = [name, f = std::forward<F>(f)]() mutable {
#if defined(__linux__)
        pthread_setname_np(pthread_self(), name);
#elif defined(__APPLE__)
        pthread_setname_np(name);
#else
        (void)name;
#endif
        f();
    };
#if defined(__unix__) || defined(__APPLE__)
    sigset_t block, old;
    sigfillset(&block);
    for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT}) sigdelset(&block, s);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    std::thread t(std::move(run));
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return t;
#else
    return std::thread(std::move(run));
#endif
}

}  // namespace mambart
