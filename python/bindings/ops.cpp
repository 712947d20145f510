// The private `_C._ops` submodule: every Backend op on numpy arrays, for the CPU and the CUDA
// backend alike, so tests (tests/test_cuda.py) and benchmarks can compare them op by op. Not
// public API: each call allocates device buffers, uploads, runs one op and downloads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "backend.h"
#include "cpu/linear.h"
#include "cpu/pool.h"
#include "error.h"
#include "options.h"
#include "sampling.h"

namespace py = pybind11;
using namespace mambart;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// A device buffer owned for the duration of one op.
class Buf {
 public:
    Buf(Backend& be, size_t bytes) : be_(be), bytes_(bytes) {
        p_ = be_.alloc(bytes, "an _ops buffer");
        be_.zero(p_, bytes);
    }
    template <typename A>
    Buf(Backend& be, const A& a) : Buf(be, size_t(a.size()) * sizeof(typename A::value_type)) {
        if (bytes_) be_.copy_to_device(p_, a.data(), bytes_);
    }
    ~Buf() { be_.dealloc(p_); }
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    template <typename T>
    T* as() const { return static_cast<T*>(p_); }
    template <typename T>
    py::array_t<T> download(std::vector<py::ssize_t> shape) const {
        py::array_t<T> out(shape);
        if (bytes_) be_.copy_to_host(out.mutable_data(), p_, size_t(out.size()) * sizeof(T));
        return out;
    }

 private:
    Backend& be_;
    size_t bytes_;
    void* p_ = nullptr;
};

// An SSM state on the backend: fp32, or rounded to bf16 (nearest even) when `bf16` (option
// state_dtype, issue 18); download() gives it back as fp32 (bf16 values widened).
class StateBuf {
 public:
    StateBuf(Backend& be, const F32& s, bool bf16)
        : bf16_(bf16), n_(size_t(s.size())), buf_(be, n_ * (bf16 ? 2 : 4)) {
        if (!bf16) {
            be.copy_to_device(buf_.as<void>(), s.data(), n_ * 4);
            return;
        }
        std::vector<uint16_t> h(n_);
        convert_from_f32(s.data(), h.data(), DType::BF16, n_);
        be.copy_to_device(buf_.as<void>(), h.data(), n_ * 2);
    }
    float* f32() const { return bf16_ ? nullptr : buf_.as<float>(); }
    uint16_t* b16() const { return bf16_ ? buf_.as<uint16_t>() : nullptr; }
    py::array_t<float> download(Backend& be, std::vector<py::ssize_t> shape) const {
        if (!bf16_) return buf_.download<float>(shape);
        std::vector<uint16_t> h(n_);
        be.copy_to_host(h.data(), buf_.as<void>(), n_ * 2);
        py::array_t<float> out(shape);
        convert_to_f32(h.data(), DType::BF16, out.mutable_data(), n_);
        return out;
    }

 private:
    bool bf16_;
    size_t n_;
    Buf buf_;
};

std::unique_ptr<Buf> maybe(Backend& be, const std::optional<F32>& a) {
    if (!a) return nullptr;
    return std::make_unique<Buf>(be, *a);
}
template <typename T>
const T* ptr(const std::unique_ptr<Buf>& b) { return b ? b->as<T>() : nullptr; }

void need(bool cond, const char* msg) {
    if (!cond) throw InvalidArgument(std::string("_ops: ") + msg);
}

// A weight placed on the backend in `dtype`, freed with it.
class PlacedWeight {
 public:
    PlacedWeight(Backend& be, const F32& w, const std::string& dtype) : be_(be) {
        need(w.ndim() == 2, "weight must be 2-D");
        const DType dt = dtype_from_name(dtype, "dtype");
        bool owned = false;
        data_ = be.place_weight(w.data(), DType::F32, size_t(w.size()), dt, &owned);
        owned_ = owned;
        weight.data = data_;
        weight.dtype = dt;
        weight.rows = w.shape(0);
        weight.cols = w.shape(1);
    }
    ~PlacedWeight() {
        if (owned_) be_.dealloc(const_cast<void*>(data_));
    }
    Weight weight;

 private:
    Backend& be_;
    const void* data_;
    bool owned_;
};

// A quantized weight (op_params.h layout) placed on the backend: `q` int8 (N, K) or packed int4
// bytes (N, K / 2), `scales` (N, K / group) fp32.
class PlacedQuantWeight {
 public:
    PlacedQuantWeight(Backend& be, const py::array& q, const F32& scales,
                      const std::string& scheme, int64_t group)
        : be_(be) {
        QuantScheme qs = QuantScheme::None;
        need(quant_scheme_from_name(scheme, &qs), "scheme must be 'int8' or 'int4'");
        need(q.ndim() == 2 && q.itemsize() == 1 && (q.flags() & py::array::c_style),
             "q must be a C-contiguous 2-D int8 / uint8 array");
        const int64_t N = q.shape(0);
        const int64_t K = qs == QuantScheme::Int4 ? q.shape(1) * 2 : q.shape(1);
        if (qs == QuantScheme::Int8) group = K;
        need(group > 0 && K % group == 0 && (qs == QuantScheme::Int8 || (K % 32 == 0 && group % 32 == 0)),
             "group must divide K (int4: K and group multiples of 32)");
        need(scales.size() == N * (K / group), "scales must be (N, K / group)");
        const DType dt = qs == QuantScheme::Int4 ? DType::U8 : DType::I8;
        bool owned = false;
        data_ = be.place_weight(q.data(), dt, size_t(q.size()), dt, &owned);
        owned_ = owned;
        sc_ = std::make_unique<Buf>(be, scales);
        be.reserve_dequant(K);  // as a model load does (CUDA: the prefill GEMM's workspace)
        weight.data = data_;
        weight.dtype = dt;
        weight.rows = N;
        weight.cols = K;
        weight.quant = qs;
        weight.scales = sc_->as<float>();
        weight.group = group;
    }
    ~PlacedQuantWeight() {
        if (owned_) be_.dealloc(const_cast<void*>(data_));
    }
    Weight weight;

 private:
    Backend& be_;
    const void* data_;
    bool owned_;
    std::unique_ptr<Buf> sc_;
};

struct Ops {
    std::shared_ptr<Backend> be;
};

// y (n, E) *= act(z (n, ld_z >= E)): silu_gate / gelu_gate.
py::array_t<float> gate_op(Ops& o, const F32& y, const F32& z,
                           void (Backend::*op)(float*, const float*, int64_t, int64_t, int64_t)) {
    Backend& be = *o.be;
    need(y.ndim() == 2 && z.ndim() == 2, "y (n, E), z (n, ld_z)");
    const int64_t n = y.shape(0), E = y.shape(1);
    need(z.shape(0) == n && z.shape(1) >= E, "gate: z (n, >= E)");
    Buf dy(be, y), dz(be, z);
    (be.*op)(dy.as<float>(), dz.as<float>(), z.shape(1), n, E);
    return dy.download<float>({n, E});
}

}  // namespace

void register_ops(py::module_& parent) {
    py::module_ m = parent.def_submodule("_ops", "Test-only: Backend ops on numpy arrays.");
    m.def(
        "read_bandwidth",
        [](int64_t bytes, int threads, int passes) {
            // Bytes per second of each pass of the read probe (cpu::read_bandwidth) on a pool of
            // `threads` (0: the cores this process may run on).
            need(bytes >= 65536 && bytes <= (int64_t(1) << 36) && passes >= 1 && passes <= 1000 &&
                     threads >= 0 && threads <= 4096,
                 "read_bandwidth: bytes in [64 KiB, 64 GiB], passes in [1, 1000], threads in [0, 4096]");
            py::gil_scoped_release release;  // no getenv: options come from the snapshot
            cpu::ThreadPool pool(threads > 0 ? threads : cpu::affinity_cores());
            cpu::PoolScope scope(&pool);
            return cpu::read_bandwidth(bytes, passes);
        },
        py::arg("bytes"), py::arg("threads") = 0, py::arg("passes") = 10);
    m.def(
        "pool_straggler_probe",
        [](int threads, int jobs, int sleep_us) {
            // The straggler guard (cpu/pool.h): `jobs` parallel loops of 64 items (about 5 us of
            // work each) on a pool of `threads`, where every chunk a worker (not the caller) runs
            // sleeps sleep_us first, as a worker preempted by another process would. Returns
            // (jobs the guard ran on the caller alone, jobs in which no worker ran a chunk,
            // items computed correctly).
            need(threads >= 2 && threads <= 64 && jobs >= 1 && jobs <= 100000 && sleep_us >= 0 &&
                     sleep_us <= 100000,
                 "pool_straggler_probe: threads in [2, 64], jobs in [1, 100000], sleep_us in [0, 1e5]");
            int64_t serial = 0, caller_only = 0, correct = 0;
            {
            py::gil_scoped_release release;  // no getenv: options come from the snapshot
            cpu::ThreadPool pool(threads);
            const std::thread::id caller = std::this_thread::get_id();
            std::vector<int64_t> out(64);
            for (int j = 0; j < jobs; ++j) {
                std::atomic<bool> worker_ran{false};
                std::fill(out.begin(), out.end(), -1);
                pool.parallel_for(64, 1, [&](int64_t b, int64_t e) {
                    if (std::this_thread::get_id() != caller) {
                        worker_ran.store(true);
                        std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
                    }
                    for (int64_t i = b; i < e; ++i) {  // about 5 us of work an item
                        const auto t0 = std::chrono::steady_clock::now();
                        while (std::chrono::steady_clock::now() - t0 < std::chrono::microseconds(5)) {
                        }
                        out[size_t(i)] = i * j;
                    }
                });
                if (!worker_ran.load()) ++caller_only;
                for (int64_t i = 0; i < 64; ++i) correct += out[size_t(i)] == i * j;
            }
            serial = int64_t(pool.serial_jobs());
            }
            return py::make_tuple(serial, caller_only, correct);
        },
        py::arg("threads"), py::arg("jobs"), py::arg("sleep_us"));
    m.def("linear_quant_kernels", [] { return std::string(cpu::linear_quant_kernels()); },
          "The CPU's quantized GEMV kernels (cpu/linear.h linear_quant_kernels).");
    py::class_<Ops>(m, "Backend")
        .def(py::init([](const std::string& device, int threads) {
                 need(threads >= 0 && threads <= 4096, "threads must be in [0, 4096]");
                 refresh_option_environment();  // the backend reads its options (GIL held)
                 return Ops{std::shared_ptr<Backend>(make_backend(device, threads))};
             }),
             py::arg("device"), py::arg("threads") = 0)
        .def_property_readonly("name", [](const Ops& o) { return o.be->name(); })
        .def_property_readonly("threads", [](const Ops& o) { return o.be->threads(); })
        .def("alloc",
             [](Ops& o, size_t bytes) {  // allocates and frees: out-of-memory reporting
                 Buf b(*o.be, bytes);
             })
        .def("embedding",
             [](Ops& o, const I32& ids, const F32& table, const std::string& dtype) {
                 Backend& be = *o.be;
                 need(table.ndim() == 2, "table must be (V, d)");
                 for (py::ssize_t i = 0; i < ids.size(); ++i)  // issue 23: no read past the table
                     need(ids.data()[i] >= 0 && ids.data()[i] < table.shape(0), "ids outside the table");
                 PlacedWeight w(be, table, dtype);
                 Buf d_ids(be, ids), out(be, size_t(ids.size() * table.shape(1)) * 4);
                 be.embedding(d_ids.as<int32_t>(), ids.size(), w.weight, out.as<float>());
                 return out.download<float>({ids.size(), table.shape(1)});
             })
        .def("add_norm",
             [](Ops& o, const F32& residual, const std::optional<F32>& hidden,
                const std::optional<F32>& w, const std::optional<F32>& b,
                const std::string& kind, float eps, bool add_only) -> py::tuple {
                 Backend& be = *o.be;
                 need(residual.ndim() == 2, "residual must be (n, d)");
                 const int64_t n = residual.shape(0), d = residual.shape(1);
                 need((!w || w->size() == d) && (!b || b->size() == d) &&
                          (!hidden || hidden->size() == n * d),
                      "w, b (d) and hidden (n, d) must match residual (n, d)");
                 Buf r(be, residual), out(be, size_t(n * d) * 4);
                 auto wb = maybe(be, w);  // None: no weight
                 auto h = maybe(be, hidden);
                 auto bb = maybe(be, b);
                 be.add_norm(r.as<float>(), ptr<float>(h), Param{ptr<float>(wb), wb ? d : 0},
                             Param{ptr<float>(bb), bb ? d : 0},
                             kind == "rms" ? NormKind::RMSNorm : NormKind::LayerNorm, eps, n, d,
                             add_only ? nullptr : out.as<float>());
                 if (add_only) return py::make_tuple(r.download<float>({n, d}), py::none());
                 return py::make_tuple(r.download<float>({n, d}), out.download<float>({n, d}));
             },
             py::arg("residual"), py::arg("hidden"), py::arg("w"), py::arg("b"), py::arg("kind"),
             py::arg("eps"), py::arg("add_only") = false)
        .def("linear",
             [](Ops& o, const F32& x, const F32& W, const std::string& dtype,
                const std::optional<F32>& bias, int64_t N) {
                 Backend& be = *o.be;
                 need(x.ndim() == 2, "x must be (M, ldx)");
                 PlacedWeight w(be, W, dtype);
                 const int64_t M = x.shape(0), ldx = x.shape(1);
                 if (N <= 0) N = w.weight.rows;
                 need(N <= w.weight.rows && ldx >= w.weight.cols && (!bias || bias->size() >= N),
                      "linear: N <= rows of W, ldx >= cols of W, bias (N)");
                 Buf dx(be, x), y(be, size_t(M * N) * 4);
                 auto bb = maybe(be, bias);
                 // as Model::reserve does before any forward (CUDA: the cuBLAS operand scratch)
                 be.reserve_scratch(M, w.weight.cols);
                 be.linear(dx.as<float>(), ldx, M, w.weight, N, ptr<float>(bb), y.as<float>(), N);
                 return y.download<float>({M, N});
             },
             py::arg("x"), py::arg("W"), py::arg("dtype"), py::arg("bias") = py::none(),
             py::arg("N") = 0)
        .def("linear_quant",
             [](Ops& o, const F32& x, const py::array& q, const F32& scales,
                const std::string& scheme, int64_t group, const std::optional<F32>& bias,
                int64_t N) {
                 Backend& be = *o.be;
                 need(x.ndim() == 2, "x must be (M, ldx)");
                 PlacedQuantWeight w(be, q, scales, scheme, group);
                 const int64_t M = x.shape(0), ldx = x.shape(1);
                 if (N <= 0) N = w.weight.rows;
                 need(N <= w.weight.rows && ldx >= w.weight.cols && (!bias || bias->size() >= N),
                      "linear_quant: N <= rows of W, ldx >= K, bias (N)");
                 Buf dx(be, x), y(be, size_t(M * N) * 4);
                 auto bb = maybe(be, bias);
                 be.reserve_scratch(M, w.weight.cols);
                 be.linear(dx.as<float>(), ldx, M, w.weight, N, ptr<float>(bb), y.as<float>(), N);
                 return y.download<float>({M, N});
             },
             py::arg("x"), py::arg("q"), py::arg("scales"), py::arg("scheme"),
             py::arg("group") = 0, py::arg("bias") = py::none(), py::arg("N") = 0)
        .def("embedding_quant",
             [](Ops& o, const I32& ids, const py::array& q, const F32& scales,
                const std::string& scheme, int64_t group) {
                 Backend& be = *o.be;
                 PlacedQuantWeight w(be, q, scales, scheme, group);
                 for (py::ssize_t i = 0; i < ids.size(); ++i)
                     need(ids.data()[i] >= 0 && ids.data()[i] < w.weight.rows, "ids outside the table");
                 const int64_t d = w.weight.cols;
                 Buf d_ids(be, ids), out(be, size_t(ids.size() * d) * 4);
                 be.embedding(d_ids.as<int32_t>(), ids.size(), w.weight, out.as<float>());
                 return out.download<float>({ids.size(), d});
             })
        .def("bench_linear_quant",
             [](Ops& o, const F32& x, const py::array& q, const F32& scales,
                const std::string& scheme, int64_t group, int reps) {
                 Backend& be = *o.be;
                 PlacedQuantWeight w(be, q, scales, scheme, group);
                 need(x.ndim() == 2 && x.shape(1) == w.weight.cols && reps >= 1,
                      "bench_linear_quant: x (M, K), reps >= 1");
                 const int64_t M = x.shape(0), N = w.weight.rows;
                 Buf dx(be, x), y(be, size_t(M * N) * 4);
                 be.reserve_scratch(M, w.weight.cols);
                 std::vector<double> secs;
                 py::gil_scoped_release release;  // no getenv: options come from the snapshot
                 for (int r = 0; r < reps; ++r) {
                     const auto t0 = std::chrono::steady_clock::now();
                     be.linear(dx.as<float>(), w.weight.cols, M, w.weight, N, nullptr,
                               y.as<float>(), N);
                     be.synchronize();
                     secs.push_back(std::chrono::duration<double>(
                                        std::chrono::steady_clock::now() - t0).count());
                 }
                 return secs;
             },
             py::arg("x"), py::arg("q"), py::arg("scales"), py::arg("scheme"),
             py::arg("group") = 0, py::arg("reps") = 10)
        .def(
            "bench_linear",
            [](Ops& o, const F32& x, const F32& W, const std::string& dtype, int reps) {
                // Seconds of each of `reps` calls of linear (y = x Wᵀ), the weight placed once
                // (tools/bench_cpu.py: the GEMV against the read-bandwidth probe).
                Backend& be = *o.be;
                need(x.ndim() == 2 && W.ndim() == 2 && x.shape(1) == W.shape(1) && reps >= 1,
                     "bench_linear: x (M, K), W (N, K), reps >= 1");
                PlacedWeight w(be, W, dtype);
                const int64_t M = x.shape(0), N = w.weight.rows;
                Buf dx(be, x), y(be, size_t(M * N) * 4);
                be.reserve_scratch(M, w.weight.cols);
                const int64_t ldx = x.shape(1);
                std::vector<double> secs;
                py::gil_scoped_release release;  // no getenv: options come from the snapshot
                for (int r = 0; r < reps; ++r) {
                    const auto t0 = std::chrono::steady_clock::now();
                    be.linear(dx.as<float>(), ldx, M, w.weight, N, nullptr, y.as<float>(), N);
                    be.synchronize();
                    secs.push_back(std::chrono::duration<double>(
                                       std::chrono::steady_clock::now() - t0).count());
                }
                return secs;
            },
            py::arg("x"), py::arg("W"), py::arg("dtype"), py::arg("reps") = 10)
        .def("conv1d",
             [](Ops& o, const F32& x, int64_t C, const F32& state, const F32& weight,
                const std::optional<F32>& bias) {
                 Backend& be = *o.be;
                 need(x.ndim() == 3 && state.ndim() == 3, "x (B, L, ld_x), state (B, C, W)");
                 const int64_t B = x.shape(0), L = x.shape(1), ld = x.shape(2), W = state.shape(2);
                 need(C >= 0 && C <= ld && state.shape(0) == B && state.shape(1) == C &&
                          weight.size() == C * W && (!bias || bias->size() == C),
                      "conv1d: C <= ld_x, state (B, C, W), weight (C, W), bias (C)");
                 Buf dx(be, x), st(be, state), wt(be, weight), out(be, size_t(B * L * C) * 4);
                 auto bb = maybe(be, bias);
                 be.conv1d(ConvParams{dx.as<float>(), ld, st.as<float>(), wt.as<float>(),
                                      ptr<float>(bb), out.as<float>(), B, L, C, W});
                 return py::make_tuple(out.download<float>({B, L, C}),
                                       st.download<float>({B, C, W}));
             })
        .def("selective_scan",
             [](Ops& o, const F32& x, const F32& dt, const F32& bc, int64_t b_off, int64_t c_off,
                const F32& z, int64_t z_off, const F32& A, const F32& D, const F32& dt_bias,
                const F32& state, bool state_bf16) {
                 // x, dt: (B, L, E); bc: (B, L, ld_bc) holding B at b_off and C at c_off;
                 // z: (B, L, ld_z) at z_off; A (E, N); state (B, E, N)
                 Backend& be = *o.be;
                 need(x.ndim() == 3 && bc.ndim() == 3 && z.ndim() == 3 && state.ndim() == 3,
                      "bad ranks");
                 const int64_t B = x.shape(0), L = x.shape(1), E = x.shape(2), N = state.shape(2);
                 need(dt.size() == B * L * E && bc.shape(0) == B && bc.shape(1) == L &&
                          b_off >= 0 && c_off >= 0 && b_off + N <= bc.shape(2) &&
                          c_off + N <= bc.shape(2) && z.shape(0) == B && z.shape(1) == L &&
                          z_off >= 0 && z_off + E <= z.shape(2) && A.size() == E * N &&
                          D.size() == E && dt_bias.size() == E && state.shape(0) == B &&
                          state.shape(1) == E,
                      "selective_scan: shapes or offsets do not match x (B, L, E), state (B, E, N)");
                 Buf dx(be, x), ddt(be, dt), dbc(be, bc), dz(be, z), dA(be, A), dD(be, D),
                     db(be, dt_bias), y(be, size_t(B * L * E) * 4);
                 StateBuf st(be, state, state_bf16);  // fp32, or bf16 (option state_dtype)
                 SelectiveScanParams p{};
                 p.x = dx.as<float>();
                 p.dt = ddt.as<float>();
                 p.Bm = dbc.as<float>() + b_off;
                 p.Cm = dbc.as<float>() + c_off;
                 p.ld_bc = bc.shape(2);
                 p.z = dz.as<float>() + z_off;
                 p.ld_z = z.shape(2);
                 p.A = dA.as<float>();
                 p.D = dD.as<float>();
                 p.dt_bias = db.as<float>();
                 p.ssm_state = st.f32();
                 p.ssm_state_bf16 = st.b16();
                 p.y = y.as<float>();
                 p.B = B;
                 p.L = L;
                 p.E = E;
                 p.N = N;
                 be.selective_scan(p);
                 return py::make_tuple(y.download<float>({B, L, E}), st.download(be, {B, E, N}));
             },
             py::arg("x"), py::arg("dt"), py::arg("bc"), py::arg("b_off"), py::arg("c_off"),
             py::arg("z"), py::arg("z_off"), py::arg("A"), py::arg("D"), py::arg("dt_bias"),
             py::arg("state"), py::arg("state_bf16") = false)
        .def("ssd_scan",
             [](Ops& o, const F32& xbc, int64_t b_off, int64_t c_off, const F32& dt,
                int64_t dt_off, const std::optional<F32>& z, const F32& A, const F32& D,
                const F32& dt_bias, float dt_min, float dt_max, const F32& state, int64_t G,
                int64_t chunk_size, bool state_bf16) {
                 // xbc: (B, L, ld) with x (H*P) at column 0, B at b_off, C at c_off;
                 // dt: (B, L, ld_dt) with dt at dt_off; z: (B, L, H*P); state (B, H, P, N)
                 Backend& be = *o.be;
                 need(xbc.ndim() == 3 && dt.ndim() == 3 && state.ndim() == 4, "bad ranks");
                 const int64_t B = xbc.shape(0), L = xbc.shape(1), H = state.shape(1),
                               P = state.shape(2), N = state.shape(3);
                 const int64_t ld = xbc.shape(2);
                 need(G >= 1 && H % G == 0, "ssd_scan: ngroups must divide nheads");
                 need(state.shape(0) == B && chunk_size >= 1 &&
                          H * P <= ld && b_off >= 0 && c_off >= 0 && b_off + G * N <= ld &&
                          c_off + G * N <= ld && dt.shape(0) == B && dt.shape(1) == L &&
                          dt_off >= 0 && dt_off + H <= dt.shape(2) &&
                          (!z || z->size() == B * L * H * P) && A.size() == H && D.size() == H &&
                          dt_bias.size() == H,
                      "ssd_scan: shapes or offsets do not match xbc (B, L, ld), state (B, H, P, N)");
                 Buf dx(be, xbc), ddt(be, dt), dA(be, A), dD(be, D), db(be, dt_bias),
                     y(be, size_t(B * L * H * P) * 4);
                 StateBuf st(be, state, state_bf16);  // fp32, or bf16 (option state_dtype)
                 auto dz = maybe(be, z);
                 SsdParams p{};
                 p.x = dx.as<float>();
                 p.Bm = dx.as<float>() + b_off;
                 p.Cm = dx.as<float>() + c_off;
                 p.ld_xbc = xbc.shape(2);
                 p.dt = ddt.as<float>() + dt_off;
                 p.ld_dt = dt.shape(2);
                 p.z = ptr<float>(dz);
                 p.ld_z = H * P;
                 p.A = dA.as<float>();
                 p.D = dD.as<float>();
                 p.dt_bias = db.as<float>();
                 p.dt_min = dt_min;
                 p.dt_max = dt_max;
                 p.ssm_state = st.f32();
                 p.ssm_state_bf16 = st.b16();
                 p.y = y.as<float>();
                 p.B = B;
                 p.L = L;
                 p.H = H;
                 p.P = P;
                 p.G = G;
                 p.N = N;
                 p.chunk_size = chunk_size;
                 be.ssd_scan(p);
                 return py::make_tuple(y.download<float>({B, L, H * P}),
                                       st.download(be, {B, H, P, N}));
             },
             py::arg("xbc"), py::arg("b_off"), py::arg("c_off"), py::arg("dt"),
             py::arg("dt_off"), py::arg("z"), py::arg("A"), py::arg("D"), py::arg("dt_bias"),
             py::arg("dt_min"), py::arg("dt_max"), py::arg("state"), py::arg("G"),
             py::arg("chunk_size"), py::arg("state_bf16") = false)
        .def("mamba3_scan",
             [](Ops& o, const F32& proj, const F32& dt_bias, const F32& B_bias, const F32& C_bias,
                const F32& B_norm_w, const F32& C_norm_w, const F32& D,
                const std::optional<F32>& mimo_x, const std::optional<F32>& mimo_z,
                const std::optional<F32>& mimo_o, const std::optional<F32>& norm_w,
                const F32& angle, const F32& ssm, const F32& k, const F32& v, int64_t G,
                bool halved, bool softplus_a, float a_floor, float eps) {
                 // proj (B, L, ld >= Din): [z | x | B | C | dd_dt | dd_A | trap | angles];
                 // angle (B, H, S), ssm (B, H, P, N), k (B, Rm, H, N), v (B, H, P).
                 // -> (y (B, L, H*P), angle, ssm, k, v) after the scan.
                 Backend& be = *o.be;
                 need(proj.ndim() == 3 && angle.ndim() == 3 && ssm.ndim() == 4 && k.ndim() == 4 &&
                          v.ndim() == 3,
                      "mamba3_scan: bad ranks");
                 const int64_t B = proj.shape(0), L = proj.shape(1), H = ssm.shape(1),
                               P = ssm.shape(2), N = ssm.shape(3), Rm = k.shape(1),
                               S = angle.shape(2);
                 need(G >= 1 && H % G == 0, "mamba3_scan: ngroups must divide nheads");
                 const int64_t Din = 2 * H * P + 2 * Rm * G * N + 3 * H + S;
                 need(proj.shape(2) >= Din && ssm.shape(0) == B && angle.shape(0) == B &&
                          angle.shape(1) == H && k.shape(0) == B && k.shape(2) == H &&
                          k.shape(3) == N && v.shape(0) == B && v.shape(1) == H &&
                          v.shape(2) == P && dt_bias.size() == H && D.size() == H &&
                          B_bias.size() == H * Rm * N && C_bias.size() == H * Rm * N &&
                          B_norm_w.size() == N && C_norm_w.size() == N &&
                          (!mimo_x || mimo_x->size() == H * Rm * P) &&
                          (!mimo_z || mimo_z->size() == H * Rm * P) &&
                          (!mimo_o || mimo_o->size() == H * Rm * P) &&
                          (!norm_w || norm_w->size() == H * P),
                      "mamba3_scan: shapes do not match proj (B, L, >= Din), ssm (B, H, P, N), "
                      "k (B, Rm, H, N), angle (B, H, S)");
                 Buf dp(be, proj), ddb(be, dt_bias), dbb(be, B_bias), dcb(be, C_bias),
                     dbn(be, B_norm_w), dcn(be, C_norm_w), dD(be, D), da(be, angle), ds(be, ssm),
                     dk(be, k), dv(be, v), y(be, size_t(B * L * H * P) * 4);
                 auto mx = maybe(be, mimo_x), mz = maybe(be, mimo_z), mo = maybe(be, mimo_o),
                      nw = maybe(be, norm_w);
                 Mamba3ScanParams p{};
                 p.proj = dp.as<float>();
                 p.ld_proj = proj.shape(2);
                 p.dt_bias = ddb.as<float>();
                 p.B_bias = dbb.as<float>();
                 p.C_bias = dcb.as<float>();
                 p.B_norm_w = dbn.as<float>();
                 p.C_norm_w = dcn.as<float>();
                 p.D = dD.as<float>();
                 p.mimo_x = ptr<float>(mx);
                 p.mimo_z = ptr<float>(mz);
                 p.mimo_o = ptr<float>(mo);
                 p.norm_w = ptr<float>(nw);
                 p.angle_state = da.as<float>();
                 p.ssm_state = ds.as<float>();
                 p.k_state = dk.as<float>();
                 p.v_state = dv.as<float>();
                 p.y = y.as<float>();
                 p.B = B;
                 p.L = L;
                 p.H = H;
                 p.P = P;
                 p.N = N;
                 p.G = G;
                 p.Rm = Rm;
                 p.S = S;
                 p.halved = halved;
                 p.softplus_a = softplus_a;
                 p.a_floor = a_floor;
                 p.eps = eps;
                 be.mamba3_scan(p);
                 return py::make_tuple(y.download<float>({B, L, H * P}),
                                       da.download<float>({B, H, S}),
                                       ds.download<float>({B, H, P, N}),
                                       dk.download<float>({B, Rm, H, N}),
                                       dv.download<float>({B, H, P}));
             })
        .def("gated_rmsnorm",
             [](Ops& o, const F32& y, const F32& z, const F32& w, int64_t group_size, float eps) {
                 Backend& be = *o.be;
                 need(y.ndim() == 2 && z.ndim() == 2, "y (n, E), z (n, ld_z)");
                 const int64_t n = y.shape(0), E = y.shape(1);
                 need(z.shape(0) == n && z.shape(1) >= E && w.size() == E && group_size >= 1 &&
                          E % group_size == 0,
                      "gated_rmsnorm: z (n, >= E), w (E), group_size dividing E");
                 Buf dy(be, y), dz(be, z), dw(be, w), out(be, size_t(n * E) * 4);
                 be.gated_rmsnorm(dy.as<float>(), dz.as<float>(), z.shape(1), dw.as<float>(), n,
                                  E, group_size, eps, out.as<float>());
                 return out.download<float>({n, E});
             })
        .def("relu_sq",
             [](Ops& o, const F32& y) {
                 Backend& be = *o.be;
                 need(y.ndim() == 2, "relu_sq: y (n, E)");
                 Buf dy(be, y);
                 be.relu_sq(dy.as<float>(), y.shape(0), y.shape(1));
                 return dy.download<float>({y.shape(0), y.shape(1)});
             })
        .def("moe",
             [](Ops& o, const F32& x, const F32& logits, const F32& w_in, const F32& w_out,
                const std::string& dtype, int64_t k, int64_t I, bool normalize, float scale,
                const F32& out) {
                 // x (R, d); logits (R, X); w_in (X, 2I d); w_out (X, d I); out (R, d) the
                 // initial value. Returns (out, route (R, 2k): ids as int32 bits, weights).
                 Backend& be = *o.be;
                 need(x.ndim() == 2 && logits.ndim() == 2 && out.ndim() == 2,
                      "moe: x (R, d), logits (R, X), out (R, d)");
                 const int64_t R = x.shape(0), d = x.shape(1), X = logits.shape(1);
                 need(logits.shape(0) == R && out.shape(0) == R && out.shape(1) == d && k >= 1,
                      "moe: shapes do not match x (R, d)");
                 PlacedWeight wi(be, w_in, dtype), wo(be, w_out, dtype);
                 Buf dx(be, x), dl(be, logits), dout(be, out),
                     route(be, size_t(std::max<int64_t>(R * 2 * k, 1)) * 4),
                     h(be, size_t(std::max<int64_t>(R * std::max<int64_t>(k, 2) * I, 1)) * 4),
                     xy(be, size_t(std::max<int64_t>(R * 2 * d, 1)) * 4);
                 MoeParams p;
                 p.x = dx.as<float>();
                 p.logits = dl.as<float>();
                 p.w_in = wi.weight;
                 p.w_out = wo.weight;
                 p.route = route.as<float>();
                 p.h = h.as<float>();
                 p.xy = xy.as<float>();
                 p.out = dout.as<float>();
                 p.R = R;
                 p.d = d;
                 p.X = X;
                 p.k = k;
                 p.I = I;
                 p.normalize = normalize;
                 p.scale = scale;
                 be.moe(p);
                 return py::make_tuple(dout.download<float>({R, d}),
                                       route.download<float>({R, 2 * k}));
             })
        .def("scale",
             [](Ops& o, const F32& y, float s) {
                 Backend& be = *o.be;
                 need(y.ndim() == 1, "scale: y (n)");
                 Buf dy(be, y);
                 be.scale(dy.as<float>(), y.shape(0), s);
                 return dy.download<float>({y.shape(0)});
             })
        .def("attention",
             [](Ops& o, const F32& qkv, const F32& k_cache, const F32& v_cache, const F32& pos,
                int64_t Hq, int64_t rotary_dim, float rope_theta, int64_t window, float scale,
                int64_t max_splits) {
                 // qkv (B, L, (Hq + 2 Hkv) hd); caches (B, max_ctx, Hkv, hd); pos (B).
                 // Returns (o (B, L, Hq hd), qkv after RoPE, k_cache, v_cache, pos).
                 Backend& be = *o.be;
                 need(qkv.ndim() == 3 && k_cache.ndim() == 4 && v_cache.ndim() == 4 &&
                          pos.ndim() == 1, "attention: bad ranks");
                 const int64_t B = qkv.shape(0), L = qkv.shape(1), ld = qkv.shape(2);
                 const int64_t T = k_cache.shape(1), Hkv = k_cache.shape(2),
                               hd = k_cache.shape(3);
                 need(B >= 1 && L >= 1 && Hq >= 1 && Hkv >= 1 && hd >= 1 && Hq % Hkv == 0 &&
                          ld == (Hq + 2 * Hkv) * hd && k_cache.shape(0) == B &&
                          v_cache.size() == k_cache.size() && pos.shape(0) == B &&
                          max_splits >= 0 && max_splits <= 1024,
                      "attention: shapes do not match qkv (B, L, (Hq + 2 Hkv) hd), caches "
                      "(B, max_ctx, Hkv, hd), pos (B)");
                 Buf dq(be, qkv), dk(be, k_cache), dv(be, v_cache), dp(be, pos),
                     out(be, size_t(B * L * Hq * hd) * 4),
                     part(be, size_t(std::max<int64_t>(B * Hq * max_splits * (hd + 2), 1)) * 4);
                 AttentionParams p{};
                 p.qkv = dq.as<float>();
                 p.ld_qkv = ld;
                 p.k_cache = dk.as<float>();
                 p.v_cache = dv.as<float>();
                 p.cache_stride = T * Hkv * hd;
                 p.pos = dp.as<float>();
                 p.pos_stride = 1;
                 p.o = out.as<float>();
                 p.partial = max_splits > 0 ? part.as<float>() : nullptr;
                 p.max_splits = max_splits;
                 p.B = B;
                 p.L = L;
                 p.Hq = Hq;
                 p.Hkv = Hkv;
                 p.hd = hd;
                 p.max_ctx = T;
                 p.rotary_dim = rotary_dim;
                 p.rope_theta = rope_theta;
                 p.window = window;
                 p.scale = scale;
                 be.attention(p);
                 return py::make_tuple(out.download<float>({B, L, Hq * hd}),
                                       dq.download<float>({B, L, ld}),
                                       dk.download<float>({B, T, Hkv, hd}),
                                       dv.download<float>({B, T, Hkv, hd}),
                                       dp.download<float>({B}));
             },
             py::arg("qkv"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos"),
             py::arg("Hq"), py::arg("rotary_dim") = 0, py::arg("rope_theta") = 10000.0f,
             py::arg("window") = 0, py::arg("scale") = 0.0f, py::arg("max_splits") = 0)
        .def("silu_gate",
             [](Ops& o, const F32& y, const F32& z) { return gate_op(o, y, z, &Backend::silu_gate); })
        .def("gelu_gate",
             [](Ops& o, const F32& y, const F32& z) { return gate_op(o, y, z, &Backend::gelu_gate); })
        .def("sample",
             [](Ops& o, const F32& logits, float temperature, int64_t top_k, float top_p,
                float min_p, float repetition_penalty, uint64_t seed, uint64_t counter,
                const std::optional<U8>& seen) -> py::tuple {
                 // One token per row; row r draws uniform(seed, r, counter). The CPU backend
                 // answers with mambart::Sampler (the reference), the CUDA backend on the device.
                 Backend& be = *o.be;
                 need(logits.ndim() == 2, "logits must be (B, V)");
                 const int64_t B = logits.shape(0), V = logits.shape(1);
                 need(V >= 1, "logits must be (B, V) with V >= 1");
                 SamplingOptions so;
                 so.temperature = temperature;
                 so.top_k = top_k;
                 so.top_p = top_p;
                 so.min_p = min_p;
                 so.repetition_penalty = repetition_penalty;
                 validate(so);
                 py::array_t<int32_t> ids(B);
                 py::array_t<uint8_t> seen_out({B, V});
                 std::vector<uint8_t> seen_host(size_t(B * V), 0);
                 if (seen) {
                     need(seen->ndim() == 2 && seen->shape(0) == B && seen->shape(1) == V,
                          "seen must be (B, V)");
                     std::copy(seen->data(), seen->data() + B * V, seen_host.begin());
                 }
                 if (be.kind() == DeviceKind::CPU) {
                     std::vector<float> row(static_cast<size_t>(V));
                     for (int64_t r = 0; r < B; ++r) {
                         Sampler s(V);
                         for (int64_t i = 0; i < V; ++i)
                             if (seen_host[size_t(r * V + i)]) s.observe(int32_t(i));
                         std::copy(logits.data() + r * V, logits.data() + (r + 1) * V, row.begin());
                         bool finite = true;
                         for (float v : row) finite = finite && std::isfinite(v);
                         if (!finite) {  // the device sampler's convention
                             ids.mutable_data()[r] = -1;
                             continue;
                         }
                         const int32_t t = s.sample(row.data(), so, seed, uint64_t(r), counter);
                         ids.mutable_data()[r] = t;
                         seen_host[size_t(r * V + t)] = 1;
                     }
                     std::copy(seen_host.begin(), seen_host.end(), seen_out.mutable_data());
                     return py::make_tuple(ids, seen_out);
                 }
                 Buf dl(be, logits), dseen(be, size_t(B * V)), dout(be, size_t(B) * 4),
                     drng(be, size_t(B) * 3 * sizeof(uint64_t));
                 be.copy_to_device(dseen.as<uint8_t>(), seen_host.data(), seen_host.size());
                 std::vector<uint64_t> rng(size_t(B) * 3);
                 for (int64_t r = 0; r < B; ++r) {
                     rng[size_t(3 * r)] = seed;
                     rng[size_t(3 * r + 1)] = uint64_t(r);
                     rng[size_t(3 * r + 2)] = counter;
                 }
                 be.copy_to_device(drng.as<uint64_t>(), rng.data(), rng.size() * sizeof(uint64_t));
                 DeviceSampleParams p{};
                 p.logits = dl.as<float>();
                 p.ld = V;
                 p.B = B;
                 p.V = V;
                 p.temperature = temperature;
                 p.top_k = top_k;
                 p.top_p = top_p;
                 p.min_p = min_p;
                 p.repetition_penalty = repetition_penalty;
                 p.rng = drng.as<uint64_t>();
                 p.seen = dseen.as<uint8_t>();
                 p.out = dout.as<int32_t>();
                 be.sample(p);
                 return py::make_tuple(dout.download<int32_t>({B}), dseen.download<uint8_t>({B, V}));
             },
             py::arg("logits"), py::arg("temperature") = 0.0f, py::arg("top_k") = 0,
             py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f,
             py::arg("repetition_penalty") = 1.0f, py::arg("seed") = 0, py::arg("counter") = 0,
             py::arg("seen") = py::none());
}
