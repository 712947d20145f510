#include "options.h"

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <mutex>

#include "error.h"

namespace mambart {
namespace {

// One row per option: its field name, variable, kind, choices, default, meaning.
const std::vector<OptionInfo> kTable = {
    {"cuda_graphs", "MAMBART_CUDA_GRAPHS", "bool", "", "1",
     "decode steps as one CUDA-graph replay per token (0: launched eagerly)"},
    {"cuda_fused", "MAMBART_CUDA_FUSED", "bool", "", "1",
     "fused single-token mixer kernels in decode (0: the separate ops)"},
    {"cuda_fused_max_batch", "MAMBART_CUDA_FUSED_MAX_BATCH", "int", "", "8",
     "the fused decode steps up to this many rows; larger batches run the separate ops (with "
     "cuda_m2_decode_wide, Mamba-2's step at every batch size)"},
    {"cuda_m2_decode_wide", "MAMBART_CUDA_M2_DECODE_WIDE", "bool", "", "1",
     "Mamba-2's fused decode step at every batch size, 64 state rows a block when batched "
     "(0: the separate ops past cuda_fused_max_batch rows)"},
    {"cuda_ssd", "MAMBART_CUDA_SSD", "choice", "chunked|auto|recurrent|tf32", "chunked",
     "Mamba-2 and Mamba-3 prefill: chunked SSD with split-TF32 products; auto (the chunked SSD "
     "with plain TF32 products for Mamba-2 layers with fp16 / bf16 weights, split TF32 "
     "otherwise; not yet measured on a GPU); the recurrent form; or chunked with plain "
     "TF32 products"},
    {"cuda_scan", "MAMBART_CUDA_SCAN", "choice", "auto|chunked|sequential|lanes", "auto",
     "Mamba-1 prefill scan: auto (time-parallel for long scans with d_state <= 16), always "
     "chunked, always sequential, or the lane-group kernel"},
    {"cublas", "MAMBART_CUBLAS", "bool", "", "1",
     "cuBLAS (loaded at run time) for prefill and batched-decode projections (0: the "
     "hand-written GEMM)"},
    {"cublas_min_rows", "MAMBART_CUBLAS_MIN_ROWS", "int", "", "4",
     "token rows from which a projection runs on cuBLAS"},
    {"cuda_gemv_tc", "MAMBART_CUDA_GEMV_TC", "bool", "", "0",
     "projections of cublas_min_rows to 32 token rows (decode batches) on the tensor-core GEMV "
     "instead of cuBLAS (fp16/bf16 weights, K a multiple of 32; measured 2-3% faster at 8 / 16 "
     "rows and 7% slower at 32 on an H100)"},
    {"cublas_library", "MAMBART_CUBLAS_LIBRARY", "path", "", "",
     "a libcublas.so to load before the default search"},
    {"cuda_pdl", "MAMBART_CUDA_PDL", "bool", "", "1",
     "programmatic dependent launch for the decode chain (compute capability 9.0+)"},
    {"cuda_load_ahead", "MAMBART_CUDA_LOAD_AHEAD", "bool", "", "1",
     "conv1d, the gated RMSNorm and the SSD state passing load their inputs into registers "
     "ahead of use (the same results; 0: the loops)"},
    {"cuda_prefetch", "MAMBART_CUDA_PREFETCH", "bool", "", "1",
     "GEMVs prefetch their weight rows into L2 before waiting on the previous kernel"},
    {"fused_projections", "MAMBART_FUSED_PROJECTIONS", "bool", "", "0",
     "decode projections with the block norm, the residual add and Mamba-1's conv step folded "
     "in (issue 16: fewer kernels a token, the same values); read when a model is loaded"},
    {"cuda_persistent_decode", "MAMBART_CUDA_PERSISTENT_DECODE", "bool", "", "0",
     "batch-1 decode of Mamba-1 layers as persistent cooperative kernels (issue 16: grid-wide "
     "barriers in place of ~6 kernels a layer, weights prefetched into L2 ahead; the same values "
     "bit for bit); read when a model is loaded"},
    {"cuda_persistent_warps", "MAMBART_CUDA_PERSISTENT_WARPS", "int", "", "16",
     "warps per multiprocessor of the persistent decode kernel: 16 (up to 128 registers a "
     "thread), or 32 from 32 (64 registers)"},
    {"cuda_persistent_rows", "MAMBART_CUDA_PERSISTENT_ROWS", "int", "", "2",
     "weight rows a warp of the persistent decode streams at once (1 or 2)"},
    {"cuda_persistent_prefetch", "MAMBART_CUDA_PERSISTENT_PREFETCH", "bool", "", "0",
     "the persistent decode's blocks prefetch later stages' weight rows into L2 (out_proj's during "
     "S1, the next layer's in_proj during S4)"},
    {"cuda_persistent_ring", "MAMBART_CUDA_PERSISTENT_RING", "int", "", "0",
     "the persistent decode's weight ring: each thread keeps up to this many 16-byte cp.async "
     "copies of its next weights in flight in shared memory, through the grid barriers (8, 16 or "
     "24; a shallower one where its shared memory does not fit; 0: off, the weights loaded as "
     "each stage begins)"},
    {"state_dtype", "MAMBART_STATE_DTYPE", "choice", "float32|bfloat16", "float32",
     "storage of the Mamba-1 / Mamba-2 SSM states (issue 18): float32, or bfloat16 (half the "
     "state bytes per sequence; the scans read bf16, compute in fp32 and round to nearest even "
     "after every token; conv windows stay float32; on CUDA prefill then runs the sequential / "
     "recurrent scan forms; models with Mamba-3 layers refuse it); read when a model is loaded; "
     "Generator(state_dtype=...) overrides it"},
    {"cuda_sync", "MAMBART_CUDA_SYNC", "bool", "", "0",
     "synchronise and check errors after every kernel (debugging; slow); read once"},
    {"cuda_free_bytes_limit", "MAMBART_CUDA_FREE_BYTES_LIMIT", "bytes", "", "0",
     "cap on the free device memory a model load or a generation sees (0: none; for tests)"},
    {"device_sampling", "MAMBART_DEVICE_SAMPLING", "bool", "", "1",
     "sample on the device inside the decode graph (0: logits copied to the host)"},
    {"engine_launch_ahead", "MAMBART_ENGINE_LAUNCH_AHEAD", "bool", "", "1",
     "the engine enqueues the next device decode before collecting the previous step's tokens "
     "when its rows did not change (0: each decode is collected before the next is launched)"},
    {"engine_admit_wait_us", "MAMBART_ENGINE_ADMIT_WAIT_US", "int", "", "500",
     "microseconds an idle engine woken by a request waits for arrivals to pause (at most four "
     "times this in all, and not once a whole prefill group is waiting), so that requests "
     "arriving together prefill as one group (0: admit each at once)"},
    {"generation_memory_limit", "MAMBART_GENERATION_MEMORY_LIMIT", "bytes", "", "0",
     "bytes of host memory one generation may take (its rows' buffers; on the CPU backend also "
     "its state and workspace); a larger request is refused up front with the estimate (0: the "
     "memory available: MemAvailable, capped by the cgroup's limit and RLIMIT_AS)"},
    {"cpu_portable", "MAMBART_CPU_PORTABLE", "bool", "", "0",
     "the generic CPU projections even where AVX2 (x86-64) or NEON (aarch64) kernels run; read "
     "once"},
    {"cpu_avx512", "MAMBART_CPU_AVX512", "bool", "", "1",
     "the AVX-512 GEMV of 2 to 16 rows where the CPU has AVX-512 F + DQ (0: the AVX2 kernels; "
     "the same sums, bit for bit, in twice the instructions); read once"},
    {"cpu_amx", "MAMBART_CPU_AMX", "bool", "", "1",
     "bf16 weights' GEMM (prefill) on AMX tiles where the CPU has AMX-BF16 and the AVX-512 "
     "kernels run (issue 22: each activation split into three bf16 parts, fp32 sums, the same "
     "bound against float64; 0: the AVX-512 GEMM); read once"},
    {"cpu_threads", "MAMBART_CPU_THREADS", "int", "", "0",
     "threads of a CPU backend, the caller's included (0: the cores this process may run on, its "
     "CPU affinity); Generator(threads=N) and --threads override it for one generator"},
    {"cpu_ssd", "MAMBART_CPU_SSD", "choice", "auto|chunked|recurrent", "auto",
     "Mamba-2 prefill on the CPU: auto (the recurrent scan where chunk_size >= d_state, as for every published Mamba-2: fewer operations, measured faster at 256 and 2048 tokens), always chunked SSD, or always recurrent"},
    {"cpu_mamba3", "MAMBART_CPU_MAMBA3", "choice", "auto|chunked|recurrent", "auto",
     "Mamba-3 scan on the CPU backend: auto (the chunked form from 64 token rows, tokens x "
     "mimo_rank, the recurrent form below), always chunked, or always recurrent; read when a CPU "
     "backend is created"},
    {"host_memory_limit", "MAMBART_HOST_MEMORY_LIMIT", "bytes", "", "0",
     "bytes of host memory a CPU model load may take (0: the memory available: MemAvailable, "
     "capped by the cgroup's limit and RLIMIT_AS)"},
    {"cache_dir", "MAMBART_CACHE", "path", "", "",
     "where converted models are kept (empty: $XDG_CACHE_HOME/mambart or ~/.cache/mambart)"},
};

std::mutex g_mu;
std::map<std::string, std::string> g_set;  // explicit settings (Python / CLI)
// The options' environment variables (variable -> value; unset ones absent), as the last
// refresh_option_environment() read them (g_env_read: one has run).
std::map<std::string, std::string> g_env;
bool g_env_read = false;
std::atomic<uint64_t> g_version{0};  // runtime_options_version()

// Variables read beside the options' own (environment_value()).
const char* const kOtherVariables[] = {"OMP_NUM_THREADS"};

std::map<std::string, std::string> read_environment() {
    std::map<std::string, std::string> env;
    for (const OptionInfo& o : kTable)
        if (const char* e = std::getenv(o.env.c_str())) env[o.env] = e;
    for (const char* v : kOtherVariables)
        if (const char* e = std::getenv(v)) env[v] = e;
    return env;
}

void ensure_read_locked() {
    if (!g_env_read) {  // nothing refreshed the snapshot yet: read it now
        g_env = read_environment();
        g_env_read = true;
    }
}

const OptionInfo* find(const std::string& name) {
    for (const OptionInfo& o : kTable)
        if (o.name == name) return &o;
    return nullptr;
}

[[noreturn]] void bad(const OptionInfo& o, const std::string& v, const std::string& what) {
    throw InvalidArgument(str_cat("option ", o.name, " (", o.env, ") = '", v, "': ", what));
}

bool parse_bool(const OptionInfo& o, const std::string& v) {
    if (v == "1" || v == "true" || v == "True" || v == "on" || v == "yes") return true;
    if (v == "0" || v == "false" || v == "False" || v == "off" || v == "no") return false;
    bad(o, v, "must be 0 or 1 (or true / false)");
}

uint64_t parse_uint(const OptionInfo& o, const std::string& v, uint64_t max) {
    if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos)
        bad(o, v, "must be a non-negative integer");
    errno = 0;
    const unsigned long long x = std::strtoull(v.c_str(), nullptr, 10);
    if (errno == ERANGE || x > max) bad(o, v, str_cat("must be at most ", max));
    return x;
}

void check(const OptionInfo& o, const std::string& v) {
    if (o.kind == "bool") parse_bool(o, v);
    else if (o.name == "cpu_threads") parse_uint(o, v, 4096);
    else if (o.name == "cuda_persistent_ring") {
        const uint64_t d = parse_uint(o, v, 24);
        if (d != 0 && d != 8 && d != 16 && d != 24) bad(o, v, "must be 0, 8, 16 or 24");
    }
    else if (o.kind == "int") {
        if (parse_uint(o, v, 1 << 30) < 1) bad(o, v, "must be >= 1");
    } else if (o.kind == "bytes") parse_uint(o, v, UINT64_MAX);
    else if (o.kind == "choice") {
        const std::string all = "|" + o.choices + "|";
        if (v.find('|') != std::string::npos || all.find("|" + v + "|") == std::string::npos)
            bad(o, v, str_cat("must be one of ", o.choices));
    }
}

// The text of option `o` now: the explicit setting, else the environment's snapshot, else the
// default. g_mu held.
std::string text_locked(const OptionInfo& o) {
    auto it = g_set.find(o.name);
    if (it != g_set.end()) return it->second;
    ensure_read_locked();
    auto e = g_env.find(o.env);
    if (e != g_env.end() && !e->second.empty()) return e->second;
    return o.deflt;
}

}  // namespace

const std::vector<OptionInfo>& option_table() { return kTable; }

std::map<std::string, std::string> runtime_options_text() {
    std::map<std::string, std::string> out;
    std::lock_guard<std::mutex> lock(g_mu);
    for (const OptionInfo& o : kTable) out[o.name] = text_locked(o);
    return out;
}

void check_runtime_option(const std::string& name, const std::string& value) {
    const OptionInfo* o = find(name);
    if (!o) {
        std::string names;
        for (const OptionInfo& x : kTable) names += (names.empty() ? "" : ", ") + x.name;
        throw InvalidArgument(str_cat("unknown option '", name, "' (options: ", names, ")"));
    }
    if (!value.empty()) check(*o, value);
}

void set_runtime_option(const std::string& name, const std::string& value) {
    check_runtime_option(name, value);
    std::lock_guard<std::mutex> lock(g_mu);
    if (value.empty())
        g_set.erase(name);
    else
        g_set[name] = value;
    g_version.fetch_add(1);
}

uint64_t runtime_options_version() { return g_version.load(); }

const char* environment_value(const char* name, std::string* buf) {
    std::lock_guard<std::mutex> lock(g_mu);
    ensure_read_locked();
    auto e = g_env.find(name);
    if (e == g_env.end()) return nullptr;
    *buf = e->second;
    return buf->c_str();
}

void refresh_option_environment() {
    std::map<std::string, std::string> env = read_environment();
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_env_read && env == g_env) return;
    g_env.swap(env);
    g_env_read = true;
    g_version.fetch_add(1);
}

RuntimeOptions runtime_options() {
    std::vector<std::string> texts;
    texts.reserve(kTable.size());
    {
        std::lock_guard<std::mutex> lock(g_mu);
        for (const OptionInfo& o : kTable) texts.push_back(text_locked(o));
    }
    RuntimeOptions r;
    for (size_t i = 0; i < kTable.size(); ++i) {
        const OptionInfo& o = kTable[i];
        const std::string& v = texts[i];
        check(o, v);
        const std::string& n = o.name;
        if (n == "cuda_graphs") r.cuda_graphs = parse_bool(o, v);
        else if (n == "cuda_fused") r.cuda_fused = parse_bool(o, v);
        else if (n == "cuda_fused_max_batch") r.cuda_fused_max_batch = int64_t(parse_uint(o, v, 1 << 30));
        else if (n == "cuda_ssd")
            r.cuda_ssd = v == "recurrent" ? CudaSsd::Recurrent
                         : v == "tf32"    ? CudaSsd::Tf32
                         : v == "auto"    ? CudaSsd::Auto
                                          : CudaSsd::Chunked;
        else if (n == "cuda_scan")
            r.cuda_scan = v == "chunked"      ? CudaScan::Chunked
                          : v == "sequential" ? CudaScan::Sequential
                          : v == "lanes"      ? CudaScan::Lanes
                                              : CudaScan::Auto;
        else if (n == "cublas") r.cublas = parse_bool(o, v);
        else if (n == "cuda_gemv_tc") r.cuda_gemv_tc = parse_bool(o, v);
        else if (n == "cuda_m2_decode_wide") r.cuda_m2_decode_wide = parse_bool(o, v);
        else if (n == "cublas_min_rows") r.cublas_min_rows = int64_t(parse_uint(o, v, 1 << 30));
        else if (n == "cublas_library") r.cublas_library = v;
        else if (n == "cuda_pdl") r.cuda_pdl = parse_bool(o, v);
        else if (n == "cuda_prefetch") r.cuda_prefetch = parse_bool(o, v);
        else if (n == "cuda_load_ahead") r.cuda_load_ahead = parse_bool(o, v);
        else if (n == "cuda_sync") r.cuda_sync = parse_bool(o, v);
        else if (n == "fused_projections") r.fused_projections = parse_bool(o, v);
        else if (n == "cuda_persistent_decode") r.cuda_persistent_decode = parse_bool(o, v);
        else if (n == "cuda_persistent_warps") r.cuda_persistent_warps = int64_t(parse_uint(o, v, 1024));
        else if (n == "cuda_persistent_rows") r.cuda_persistent_rows = int64_t(parse_uint(o, v, 2));
        else if (n == "cuda_persistent_prefetch") r.cuda_persistent_prefetch = parse_bool(o, v);
        else if (n == "cuda_persistent_ring") r.cuda_persistent_ring = int64_t(parse_uint(o, v, 24));
        else if (n == "state_dtype") r.state_dtype = v == "bfloat16" ? DType::BF16 : DType::F32;
        else if (n == "cuda_free_bytes_limit") r.cuda_free_bytes_limit = parse_uint(o, v, UINT64_MAX);
        else if (n == "device_sampling") r.device_sampling = parse_bool(o, v);
        else if (n == "engine_launch_ahead") r.engine_launch_ahead = parse_bool(o, v);
        else if (n == "engine_admit_wait_us") r.engine_admit_wait_us = int64_t(parse_uint(o, v, 1000000));
        else if (n == "generation_memory_limit") r.generation_memory_limit = parse_uint(o, v, UINT64_MAX);
        else if (n == "cpu_portable") r.cpu_portable = parse_bool(o, v);
        else if (n == "cpu_avx512") r.cpu_avx512 = parse_bool(o, v);
        else if (n == "cpu_amx") r.cpu_amx = parse_bool(o, v);
        else if (n == "cpu_ssd")
            r.cpu_ssd = v == "chunked" ? CpuSsd::Chunked : v == "recurrent" ? CpuSsd::Recurrent : CpuSsd::Auto;
        else if (n == "cpu_threads") r.cpu_threads = int64_t(parse_uint(o, v, 4096));
        else if (n == "cpu_mamba3")
            r.cpu_mamba3 = v == "chunked"     ? CpuMamba3::Chunked
                           : v == "recurrent" ? CpuMamba3::Recurrent
                                              : CpuMamba3::Auto;
        else if (n == "host_memory_limit") r.host_memory_limit = parse_uint(o, v, UINT64_MAX);
        else if (n == "cache_dir") r.cache_dir = v;
    }
    return r;
}

}  // namespace mambart
