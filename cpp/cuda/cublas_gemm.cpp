// cuBLAS GEMMs through a run-time loaded libcublas: see cublas_gemm.h.
//
// The library is looked up, in order: $MAMBART_CUBLAS_LIBRARY (a path to libcublas.so.*), the
// dynamic loader's search path (libcublas.so.<major of the headers built against>), and the
// library directory of the CUDA toolkit the module was built with (MAMBART_CUBLAS_DIR, with its
// libcublasLt loaded first). MAMBART_CUBLAS=0 (read by the backend) skips all of this.
#include "cublas_gemm.h"

#include <cuda_runtime.h>

#include "../../cuda/check.h"
#include "error.h"
#include "options.h"

#if MAMBART_HAVE_CUBLAS
#include <cublas_v2.h>
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#endif

namespace mambart {
namespace cublas {

#if MAMBART_HAVE_CUBLAS
namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

struct Lib {
    using CreateFn = cublasStatus_t (*)(cublasHandle_t*);
    using DestroyFn = cublasStatus_t (*)(cublasHandle_t);
    using SetStreamFn = cublasStatus_t (*)(cublasHandle_t, cudaStream_t);
    using SetWorkspaceFn = cublasStatus_t (*)(cublasHandle_t, void*, size_t);
    using GetVersionFn = cublasStatus_t (*)(cublasHandle_t, int*);
    using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                        int, int, const void*, const void*, cudaDataType, int,
                                        const void*, cudaDataType, int, const void*, void*,
                                        cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
    CreateFn create = nullptr;
    DestroyFn destroy = nullptr;
    SetStreamFn set_stream = nullptr;
    SetWorkspaceFn set_workspace = nullptr;
    GetVersionFn get_version = nullptr;
    GemmExFn gemm_ex = nullptr;
    std::string error;  // empty when loaded
};

void* open_first(std::string* tried) {
    const std::string so = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    const std::string first = runtime_options().cublas_library;  // MAMBART_CUBLAS_LIBRARY
    if (!first.empty()) {
        if (void* h = dlopen(first.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
        *tried += first + ": " + dlerror() + "; ";
    }
    if (void* h = dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
    *tried += so + ": " + dlerror() + "; ";
#ifdef MAMBART_CUBLAS_DIR
    const std::string dir = MAMBART_CUBLAS_DIR;
    const std::string lt = dir + "/libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
    dlopen(lt.c_str(), RTLD_NOW | RTLD_GLOBAL);  // libcublas's own dependency, same directory
    const std::string full = dir + "/" + so;
    if (void* h = dlopen(full.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
    *tried += full + ": " + dlerror() + "; ";
#endif
    return nullptr;
}

Lib load() {
    Lib l;
    std::string tried;
    void* h = open_first(&tried);
    if (!h) {
        l.error = "libcublas could not be loaded (" + tried + ")";
        return l;
    }
    auto sym = [&](const char* name) {
        void* s = dlsym(h, name);
        if (!s && l.error.empty()) l.error = std::string("libcublas lacks ") + name;
        return s;
    };
    l.create = reinterpret_cast<Lib::CreateFn>(sym("cublasCreate_v2"));
    l.destroy = reinterpret_cast<Lib::DestroyFn>(sym("cublasDestroy_v2"));
    l.set_stream = reinterpret_cast<Lib::SetStreamFn>(sym("cublasSetStream_v2"));
    l.set_workspace = reinterpret_cast<Lib::SetWorkspaceFn>(sym("cublasSetWorkspace_v2"));
    l.get_version = reinterpret_cast<Lib::GetVersionFn>(sym("cublasGetVersion_v2"));
    l.gemm_ex = reinterpret_cast<Lib::GemmExFn>(sym("cublasGemmEx"));
    return l;  // the handle stays open for the life of the process
}

const Lib& lib() {
    static const Lib l = load();  // thread-safe, once per process
    return l;
}

}  // namespace

Gemm::Gemm(cudaStream_t stream) {
    const Lib& l = lib();
    if (!l.error.empty()) {
        reason_ = l.error;
        return;
    }
    cublasHandle_t h = nullptr;
    cublasStatus_t st = l.create(&h);
    if (st != CUBLAS_STATUS_SUCCESS) {
        reason_ = "cublasCreate failed (status " + std::to_string(int(st)) + ")";
        return;
    }
    if (cudaMalloc(&workspace_, kWorkspaceBytes) != cudaSuccess) {
        (void)cudaGetLastError();
        workspace_ = nullptr;
        l.destroy(h);
        reason_ = "no device memory for the cuBLAS workspace";
        return;
    }
    if (l.set_stream(h, stream) != CUBLAS_STATUS_SUCCESS ||
        l.set_workspace(h, workspace_, kWorkspaceBytes) != CUBLAS_STATUS_SUCCESS) {
        l.destroy(h);
        cudaFree(workspace_);
        workspace_ = nullptr;
        reason_ = "cublasSetStream / cublasSetWorkspace failed";
        return;
    }
    int v = 0;
    if (l.get_version(h, &v) == CUBLAS_STATUS_SUCCESS)
        version_ = "cuBLAS " + std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) +
                   "." + std::to_string(v % 100);
    handle_ = h;
}

Gemm::~Gemm() {
    if (handle_) lib().destroy(static_cast<cublasHandle_t>(handle_));
    if (workspace_) cudaFree(workspace_);
}

void Gemm::run(const void* a, const void* W, DType dtype, float* y, int64_t ldy, int64_t M,
               int64_t N, int64_t K) {
    MAMBART_CHECK_ARG(handle_, "cublas::Gemm::run: cuBLAS is not available (", reason_, ")");
    MAMBART_CHECK_ARG(dtype == DType::F16 || dtype == DType::BF16,
                      "cublas::Gemm::run: dtype must be float16 or bfloat16");
    MAMBART_CHECK_ARG(M > 0 && N > 0 && K > 0 && M < (int64_t(1) << 31) &&
                          N < (int64_t(1) << 31) && K < (int64_t(1) << 31) && ldy >= N &&
                          ldy < (int64_t(1) << 31),
                      "cublas::Gemm::run: bad sizes M=", M, " N=", N, " K=", K, " ldy=", ldy);
    const cudaDataType t = dtype == DType::F16 ? CUDA_R_16F : CUDA_R_16BF;
    const float one = 1.0f, zero = 0.0f;
    // Column-major view: C = yᵀ (N x M, ldc = ldy) = op_T(A) · B, with A = W seen as a K x N
    // column-major matrix (lda = K) and B = a seen as a K x M column-major matrix (ldb = K).
    const cublasStatus_t st =
        lib().gemm_ex(static_cast<cublasHandle_t>(handle_), CUBLAS_OP_T, CUBLAS_OP_N, int(N),
                      int(M), int(K), &one, W, t, int(K), a, t, int(K), &zero, y, CUDA_R_32F,
                      int(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        throw CudaError(str_cat("cublasGemmEx failed (status ", int(st), ") for M=", M, " N=", N,
                                " K=", K));
}

#else  // built without cuBLAS headers

Gemm::Gemm(cudaStream_t) { reason_ = "built without cuBLAS (its headers were not found)"; }
Gemm::~Gemm() = default;
void Gemm::run(const void*, const void*, DType, float*, int64_t, int64_t, int64_t, int64_t) {
    throw Unsupported("cublas::Gemm::run: built without cuBLAS");
}

#endif

}  // namespace cublas
}  // namespace mambart
