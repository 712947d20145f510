// _C bindings of speculative decoding (cpp/speculative.h, issue 25): python/mambart/generator.py
// (generate(..., speculative=...)) wraps them. Registered after module.cpp's Generator.
#include <functional>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "error.h"
#include "generator.h"
#include "release_gil.h"

namespace py = pybind11;
using namespace mambart;

void register_speculative_api(py::module_& m) {
    auto gen = py::reinterpret_borrow<py::class_<Generator>>(m.attr("Generator"));
    m.attr("SPECULATIVE_MAX_K") = SpeculativeOptions::kMaxK;
    gen.def(
           "generate_speculative",
           // -> (RawResult, stats dict). method: "prompt_lookup" | "draft"; draft: the draft
           // model's _C.Generator (may be this one) or None.
           [](Generator& g, const std::vector<int32_t>& prompt, const GenerationOptions& opt,
              const std::string& method, int64_t k, int64_t ngram_max, int64_t ngram_min,
              Generator* draft, bool recompute, bool adaptive, py::object callback) {
               SpeculativeOptions so;
               if (method == "prompt_lookup")
                   so.method = SpeculativeOptions::Method::PromptLookup;
               else if (method == "draft")
                   so.method = SpeculativeOptions::Method::Draft;
               else
                   throw InvalidArgument("speculative method = '" + method +
                                         "': expected 'prompt_lookup' or 'draft'");
               so.k = k;
               so.ngram_max = ngram_max;
               so.ngram_min = ngram_min;
               so.recompute = recompute;
               so.adaptive = adaptive;
               SpeculativeStats st;
               GenerationResult r;
               {
                   // callback(token) -> bool per emitted token (False: stop, "cancelled"),
                   // called on this thread with the GIL taken for it (stream(speculative=)).
                   std::function<bool(int32_t)> cb;
                   if (!callback.is_none())
                       cb = [&callback](int32_t tok) {
                           py::gil_scoped_acquire gil;
                           return callback(tok).cast<bool>();
                       };
                   ReleaseGil release;
                   r = g.generate_speculative(prompt, opt, so, draft, &st, cb);
               }
               py::dict d;
               d["proposed"] = st.proposed;
               d["accepted"] = st.accepted;
               d["verifications"] = st.verifications;
               d["draft_forwards"] = st.draft_forwards;
               d["propose_ms"] = st.propose_ms;
               d["verify_ms"] = st.verify_ms;
               d["rollback_ms"] = st.rollback_ms;
               d["k_last"] = st.k_last;
               return py::make_tuple(r, d);
           },
           py::arg("prompt"), py::arg("options"), py::arg("method"), py::arg("k"),
           py::arg("ngram_max") = 3, py::arg("ngram_min") = 1, py::arg("draft") = nullptr,
           py::arg("recompute") = false, py::arg("adaptive") = false,
           py::arg("callback") = py::none())
        .def(
            "traced_states",
            // Test hook: (list over tokens of [state tensors as float32 arrays], logits (L, V)).
            [](Generator& g, const std::vector<int32_t>& prompt,
               const std::vector<int32_t>& tokens) {
                const int64_t V = g.config().vocab_size;
                py::array_t<float> logits({int64_t(tokens.size()), V});
                std::vector<std::vector<std::vector<float>>> st;
                float* lp = logits.mutable_data();
                {
                    ReleaseGil release;
                    st = g.traced_states(prompt, tokens, lp);
                }
                py::list out;
                for (auto& row : st) {
                    py::list tensors;
                    for (auto& t : row) {
                        py::array_t<float> a(int64_t(t.size()));
                        std::copy(t.begin(), t.end(), a.mutable_data());
                        tensors.append(a);
                    }
                    out.append(tensors);
                }
                return py::make_tuple(out, logits);
            },
            py::arg("prompt"), py::arg("tokens"))
        .def(
            "verification_ms",
            // Benchmark hook: (median ms of a verification pass, median ms of keeping a state).
            [](Generator& g, const std::vector<int32_t>& prompt,
               const std::vector<int32_t>& tokens, int64_t iters, bool trace) {
                double keep = 0.0, ms;
                {
                    ReleaseGil release;
                    ms = g.verification_ms(prompt, tokens, iters, trace, &keep);
                }
                return py::make_tuple(ms, keep);
            },
            py::arg("prompt"), py::arg("tokens"), py::arg("iters") = 20,
            py::arg("trace") = true);
}
