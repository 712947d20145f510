// L0 base: the runtime options, in one struct. Every switch of the runtime is a field here, with
// one line in the table of cpp/options.cpp (its name, environment variable, kind, default and
// meaning) and one row in docs/options.md. Set from the environment (MAMBART_*), from Python
// (mambart.set_options) or from the CLI (mambart -o NAME=VALUE): an option set explicitly wins
// over the environment. Read where the thing it controls is made (a backend, a stream), so
// setting an option affects backends and generators created afterwards.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dtype.h"

namespace mambart {

enum class CudaSsd { Auto, Chunked, Recurrent, Tf32 };
enum class CudaScan { Auto, Chunked, Sequential, Lanes };
enum class CpuSsd { Auto, Chunked, Recurrent };
enum class CpuMamba3 { Auto, Chunked, Recurrent };

struct RuntimeOptions {
    // ---- CUDA backend (read when a CUDA backend is created) ----
    bool cuda_graphs = true;            // decode steps as one CUDA-graph replay (false: eager)
    bool cuda_fused = true;             // fused single-token mixer steps (false: the separate ops)
    int64_t cuda_fused_max_batch = 8;   // the fused decode steps up to this many rows
    CudaSsd cuda_ssd = CudaSsd::Chunked;   // Mamba-2 / Mamba-3 prefill: chunked SSD (split
                                           // TF32; auto: plain TF32 for half-precision Mamba-2
                                           // layers), the recurrent form, or plain TF32
    CudaScan cuda_scan = CudaScan::Auto;   // Mamba-1 prefill scan form
    bool cublas = true;                 // cuBLAS for prefill / batched projections
    int64_t cublas_min_rows = 4;        // token rows from which cuBLAS runs a projection
    bool cuda_gemv_tc = false;          // decode batches' projections on the tensor-core GEMV
    bool cuda_m2_decode_wide = true;    // Mamba-2's fused decode step, batched form
    std::string cublas_library;         // a libcublas to try first ("" : the default search)
    bool cuda_pdl = true;               // programmatic dependent launch (sm_90+)
    bool cuda_prefetch = true;          // GEMVs prefetch weight rows into L2 ahead of PDL waits
    bool cuda_load_ahead = true;        // conv1d / gated norm / SSD state passing load ahead
    bool fused_projections = false;     // decode projections with the norm, residual add and
                                        // Mamba-1 conv step folded in (read at model load)
    bool cuda_persistent_decode = false;  // batch-1 decode as persistent kernels (issue 16;
                                          // read at model load)
    int64_t cuda_persistent_warps = 16;   // warps per SM of the persistent decode kernel
    int64_t cuda_persistent_rows = 2;     // weight rows a warp streams at once (1 or 2)
    bool cuda_persistent_prefetch = false; // its blocks prefetch later stages' weights
    int64_t cuda_persistent_ring = 0;     // its weight ring: cp.async copies in flight a thread
    DType state_dtype = DType::F32;     // SSM state storage: F32 or BF16 (read at model load;
                                        // issue 18)
    bool cuda_sync = false;             // synchronise and check after every kernel (debugging)
    uint64_t cuda_free_bytes_limit = 0; // cap on the free device memory a load or generation sees
    // ---- generation ----
    bool device_sampling = true;        // sample on the device in graph decode steps
    bool engine_launch_ahead = true;    // the engine enqueues the next device decode before
                                        // collecting the previous one (rows unchanged)
    int64_t engine_admit_wait_us = 500; // an idle engine woken by a request waits until arrivals
                                        // pause this long (at most 4x in all) so that a burst
                                        // prefills as one group (0: admit at once)
    uint64_t generation_memory_limit = 0;  // bytes of host memory one generation may take
                                           // (0: what is available, host_memory_available())
    // ---- CPU backend and loading ----
    bool cpu_portable = false;          // the generic CPU projections even where AVX2 / NEON run
    bool cpu_avx512 = true;             // the AVX-512 GEMV where the CPU has it (0: AVX2's)
    bool cpu_amx = true;                // bf16 weights' GEMM on AMX where the CPU has it
    int64_t cpu_threads = 0;            // CPU backend threads (0: the cores of this process's
                                        // CPU affinity); a Generator's threads= wins
    CpuSsd cpu_ssd = CpuSsd::Auto;      // Mamba-2 prefill form on the CPU (auto: by shape)
    CpuMamba3 cpu_mamba3 = CpuMamba3::Auto;  // Mamba-3 scan form on the CPU (auto: by length)
    uint64_t host_memory_limit = 0;     // bytes of host memory a CPU load may take (0: what is
                                        // available, host_memory_available())
    // ---- Python package ----
    std::string cache_dir;              // converted-model cache ("" : $XDG_CACHE_HOME/mambart)
};

// The options now: the environment, overridden by what set_runtime_option() set. Throws
// InvalidArgument naming the option (and variable) for a value it cannot parse.
RuntimeOptions runtime_options();

// The environment is read only by refresh_option_environment(), into a process-wide snapshot
// that runtime_options() reads: getenv is not safe against a concurrent setenv / putenv (glibc
// may move the environment array while another thread reads it), an application's threads
// change their environment at any time (Python's os.environ[...] = ... calls putenv, pytest
// sets PYTEST_CURRENT_TEST at every test phase), and the runtime's own threads (the engine's
// loop) read options. The surfaces refresh the snapshot where the application is not changing
// its environment: the Python bindings with the GIL held (every call that releases it), the
// C API in mambart_model_load. The first read of an option refreshes it if nothing has.
void refresh_option_environment();
// Bumped by every set_runtime_option() and by every refresh that changed a value: a runtime
// thread re-reads its options only when this moved.
uint64_t runtime_options_version();
// A variable of the snapshot that is not an option's (OMP_NUM_THREADS), as getenv would give
// it (nullptr where unset; the text is copied into *buf).
const char* environment_value(const char* name, std::string* buf);

// Sets option `name` (the field name, e.g. "cuda_graphs") from its text form, as its
// environment variable would ("0"/"1"/"true"/"false" for booleans); an empty value clears the
// override (the environment applies again). Throws InvalidArgument for an unknown name or a
// bad value.
void set_runtime_option(const std::string& name, const std::string& value);
// The checks of set_runtime_option without setting anything.
void check_runtime_option(const std::string& name, const std::string& value);

struct OptionInfo {
    std::string name;     // field name
    std::string env;      // environment variable
    std::string kind;     // bool, int, bytes, choice, path
    std::string choices;  // for choice: "a|b|c"
    std::string deflt;    // default, as text
    std::string help;
};
// Every option, in table order (docs/options.md is this table).
const std::vector<OptionInfo>& option_table();
// The options now as name -> text.
std::map<std::string, std::string> runtime_options_text();

}  // namespace mambart
