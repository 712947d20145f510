// The _C pybind11 module: Generator, GenerationStream, options and results, exception
// translation, and a few test-only entry points (safetensors inspection, sampling on given
// logits). Every call that computes releases the GIL.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

#include "backend.h"
#include "config.h"
#include "error.h"
#include "engine.h"
#include "generator.h"
#include "token_bytes.h"
#include "layers/registry.h"
#include "model.h"
#include "options.h"
#include "safetensors.h"
#include "sampling.h"
#include "release_gil.h"

namespace py = pybind11;
using namespace mambart;

namespace {

std::optional<DType> parse_dtype(const std::optional<std::string>& s) {
    if (!s) return std::nullopt;
    return dtype_from_name(*s, "dtype");
}

py::array_t<float> to_array_f(const std::vector<float>& v) {
    py::array_t<float> a(int64_t(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

py::object json_loads(const std::string& text) {
    return py::module_::import("json").attr("loads")(text);
}

// The model's config as a dict: the model's own keys, `layers` (one dict per layer, the
// entries of config.json's list), and, when every layer has the same config, that config's
// fields at the top level too (d_inner, d_state, ... as in the flat form).
py::dict config_to_dict(const ModelConfig& c) {
    py::dict d;
    d["architecture"] = c.architecture;
    d["d_model"] = c.d_model;
    d["n_layer"] = c.n_layer;
    d["vocab_size"] = c.vocab_size;
    d["vocab_size_padded"] = c.vocab_size_padded;
    py::list layers;
    bool uniform = true;
    for (const auto& l : c.layers) {
        const std::string j = l->to_json();
        uniform = uniform && j == c.layers.front()->to_json();
        layers.append(json_loads(j));
    }
    if (uniform && !c.layers.empty()) {
        py::dict first = json_loads(c.layers.front()->to_json());
        for (auto kv : first)
            if (kv.first.cast<std::string>() != "type") d[kv.first] = kv.second;
    }
    d["layers"] = layers;
    d["layer_types"] = c.layer_types_summary();
    d["norm"] = c.norm == NormKind::RMSNorm ? "rmsnorm" : "layernorm";
    d["norm_eps"] = c.norm_eps;
    d["residual_in_fp32"] = c.residual_in_fp32;
    d["tie_embeddings"] = c.tie_embeddings;
    if (c.embedding_multiplier != 1.0) d["embedding_multiplier"] = c.embedding_multiplier;
    if (c.residual_multiplier != 1.0) d["residual_multiplier"] = c.residual_multiplier;
    if (c.logits_scaling != 1.0) d["logits_scaling"] = c.logits_scaling;
    d["eos_token_id"] = c.eos_token_id >= 0 ? py::object(py::int_(c.eos_token_id)) : py::none();
    d["bos_token_id"] = c.bos_token_id >= 0 ? py::object(py::int_(c.bos_token_id)) : py::none();
    d["dtype"] = dtype_name(c.dtype);
    d["num_params"] = c.num_params();
    return d;
}

// The state layout of a config: one dict per state tensor (State::slots() order) with its file
// name, full shape (layers in the slot, shape...), dtype and the layers it holds.
py::list state_spec(const ModelConfig& c) {
    py::list out;
    for (const State::Slot& x : State::layout(c)) {
        std::vector<int64_t> shape{int64_t(x.layers.size())};
        shape.insert(shape.end(), x.shape.begin(), x.shape.end());
        py::dict e;
        e["name"] = x.name;
        e["shape"] = py::tuple(py::cast(shape));
        e["dtype"] = x.dtype == DType::BF16 ? "BF16" : "F32";  // on the device (option state_dtype)
        e["layers"] = py::cast(x.layers);
        out.append(e);
    }
    return out;
}

py::list layer_type_list(const ModelConfig& c) {
    py::list out;
    for (const auto& l : c.layers) out.append(l->type());
    return out;
}

py::tuple host_tuple(const std::vector<std::vector<float>>& v) {
    py::tuple t(v.size());
    for (size_t i = 0; i < v.size(); ++i) t[i] = to_array_f(v[i]);
    return t;
}

SamplingOptions make_sampling(float temperature, int64_t top_k, float top_p, float min_p,
                              float repetition_penalty) {
    SamplingOptions o;
    o.temperature = temperature;
    o.top_k = top_k;
    o.top_p = top_p;
    o.min_p = min_p;
    o.repetition_penalty = repetition_penalty;
    validate(o);
    return o;
}

std::vector<float> logits_vector(const py::array_t<float, py::array::c_style | py::array::forcecast>& a) {
    if (a.ndim() != 1) throw InvalidArgument("logits must be a 1-D float32 array");
    return std::vector<float>(a.data(), a.data() + a.size());
}

}  // namespace

// python/bindings/ops.cpp: the test-only `_C._ops` submodule.
void register_ops(py::module_& parent);
// python/bindings/states.cpp: state files, the model fingerprint, the prompt cache.
void register_state_files(py::module_& m);
// python/bindings/speculative.cpp: speculative decoding (issue 25).
void register_speculative_api(py::module_& m);

// ---- issue 7: sequence states, per-row options, scoring (registered after the classes above) --
namespace {

py::array_t<float> to_array(const std::vector<float>& v) {
    py::array_t<float> a(int64_t(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

std::vector<std::shared_ptr<const SequenceState>> state_list(py::handle starts, size_t n) {
    std::vector<std::shared_ptr<const SequenceState>> out;
    if (starts.is_none()) return out;
    for (py::handle h : starts) {
        if (h.is_none())
            out.emplace_back();
        else if (py::isinstance<SequenceState>(h))
            out.push_back(h.cast<std::shared_ptr<SequenceState>>());
        else
            throw py::type_error("states must be a list of SequenceState or None");
    }
    (void)n;
    return out;
}

void register_state_api(py::module_& m) {
    auto opts = py::reinterpret_borrow<py::class_<GenerationOptions>>(m.attr("GenerationOptions"));
    opts.def_readwrite("rng_stream", &GenerationOptions::rng_stream)
        .def_readwrite("rng_counter", &GenerationOptions::rng_counter);
    auto res = py::reinterpret_borrow<py::class_<GenerationResult>>(m.attr("RawResult"));
    res.def_readonly("prefill_tokens", &GenerationResult::prefill_tokens);

    // dynamic_attr: the Python SequenceState wrapping one keeps a weak reference on it, so the
    // same native state (e.g. a prompt-cache entry) comes back as the same Python object.
    py::class_<SequenceState, std::shared_ptr<SequenceState>>(m, "SequenceState",
                                                              py::dynamic_attr())
        .def_property_readonly("tokens", [](const SequenceState& s) { return s.tokens; })
        .def_property_readonly("num_tokens",
                               [](const SequenceState& s) { return int64_t(s.tokens.size()); })
        .def_readonly("fed", &SequenceState::fed)
        .def_property_readonly("pending", &SequenceState::pending)
        .def_property_readonly("logits",
                               [](const SequenceState& s) -> py::object {
                                   if (s.logits.empty()) return py::none();
                                   return to_array(s.logits);
                               })
        .def_readonly("has_rng", &SequenceState::has_rng)
        .def_readonly("seed", &SequenceState::seed)
        .def_readonly("stream", &SequenceState::stream)
        .def_readonly("counter", &SequenceState::counter)
        .def_property_readonly("nbytes", &SequenceState::bytes)
        .def("to_host",
             [](const SequenceState& s) {  // -> one flat fp32 host copy per state tensor
                 return host_tuple(s.state->row_to_host(0));
             })
        .def_property_readonly("device", [](const SequenceState& s) {
            return s.backend ? s.backend->name() : std::string("none");
        });

    auto stream = py::reinterpret_borrow<py::class_<GenerationStream>>(m.attr("GenerationStream"));
    stream
        .def("row_state",
             [](GenerationStream& s, int64_t row) {
                 ReleaseGil release;
                 return s.row_state(row);
             })
        .def("prompt_state", &GenerationStream::prompt_state)
        .def_property_readonly("prefill_forward_calls",
                               &GenerationStream::prefill_forward_calls,
                               "Model forward calls of the prefill (rows prefill together).");

    auto gen = py::reinterpret_borrow<py::class_<Generator>>(m.attr("Generator"));
    gen.def(
           "start_rows",
           // Like start(); per-row options (a list of GenerationOptions, one or one per prompt),
           // start states (None or a list of SequenceState/None) and keep_states.
           [](py::object self, py::handle prompts, py::handle options, py::handle starts,
              bool keep_states) {
               Generator& g = self.cast<Generator&>();
               std::vector<std::vector<int32_t>> p;
               std::vector<GenerationOptions> o;
               try {
                   p = prompts.cast<std::vector<std::vector<int32_t>>>();
               } catch (const py::cast_error&) {
                   throw py::type_error("prompts must be a list of lists of int32 token ids");
               }
               for (py::handle h : options) {
                   if (!py::isinstance<GenerationOptions>(h))
                       throw py::type_error("options must be a list of GenerationOptions");
                   o.push_back(h.cast<const GenerationOptions&>());
               }
               if (o.empty()) throw InvalidArgument("options must not be empty");
               auto st = state_list(starts, p.size());
               py::object s = py::cast(g.start(p, o, st, keep_states));
               py::detail::keep_alive_impl(s, self);
               return s;
           },
           py::arg("prompts"), py::arg("options"), py::arg("states") = py::none(),
           py::arg("keep_states") = false)
        .def(
            "prefill",
            [](Generator& g, const std::vector<int32_t>& ids,
               std::shared_ptr<SequenceState> from) {
                ReleaseGil release;
                return g.prefill(ids, from.get());
            },
            py::arg("token_ids"), py::arg("state") = nullptr)
        .def(
            "score",
            [](Generator& g, const std::vector<int32_t>& ids,
               std::shared_ptr<SequenceState> from) {
                const int64_t n = int64_t(ids.size()) - (from ? 0 : 1);
                py::array_t<double> lp(std::max<int64_t>(n, 0));
                py::array_t<bool> greedy(std::max<int64_t>(n, 0));
                std::vector<uint8_t> gr(size_t(std::max<int64_t>(n, 0)));
                {
                    double* p = lp.mutable_data();
                    ReleaseGil release;
                    g.score(ids, from.get(), p, gr.data());
                }
                bool* gp = greedy.mutable_data();
                for (size_t i = 0; i < gr.size(); ++i) gp[i] = gr[i] != 0;
                return py::make_tuple(lp, greedy);
            },
            py::arg("token_ids"), py::arg("state") = nullptr,
            "-> (logprobs float64 array, greedy bool array); see Generator::score.")
        .def(
            "state_to_host",
            [](const Generator& g, const SequenceState& s) {
                return host_tuple(g.state_to_host(s));
            },
            py::arg("state"))
        .def(
            "state_from_host",
            [](Generator& g, py::sequence tensors, const std::vector<int32_t>& tokens,
               int64_t fed, py::object logits, bool has_rng, uint64_t seed, uint64_t stream,
               uint64_t counter) {
                std::vector<std::vector<float>> ts;
                for (py::handle h : tensors) {
                    auto a = h.cast<py::array_t<float, py::array::c_style |
                                                           py::array::forcecast>>();
                    ts.emplace_back(a.data(), a.data() + a.size());
                }
                std::vector<float> l;
                if (!logits.is_none()) {
                    auto a = logits.cast<py::array_t<float, py::array::c_style |
                                                                py::array::forcecast>>();
                    l.assign(a.data(), a.data() + a.size());
                }
                auto st = g.state_from_host(ts, tokens, fed, std::move(l));
                st->has_rng = has_rng;
                st->seed = seed;
                st->stream = stream;
                st->counter = counter;
                return st;
            },
            py::arg("tensors"), py::arg("tokens"), py::arg("fed"),
            py::arg("logits"), py::arg("has_rng") = false, py::arg("seed") = 0,
            py::arg("stream") = 0, py::arg("counter") = 0);
}


// ---- issue 14: the engine ------------------------------------------------------------------------
FinishReason finish_reason_from(const std::string& r) {
    for (FinishReason f : {FinishReason::Length, FinishReason::Eos, FinishReason::StopToken,
                           FinishReason::StopString, FinishReason::Cancelled,
                           FinishReason::Timeout, FinishReason::Error})
        if (r == finish_reason_name(f)) return f;
    throw InvalidArgument(str_cat("unknown finish reason '", r, "'"));
}

py::dict stats_dict(const EngineStats& s) {
    py::dict d;
    d["running"] = s.running;
    d["prefilling"] = s.prefilling;
    d["queued"] = s.queued;
    d["slots"] = s.slots;
    d["prefill_state_rows"] = s.prefill_state_rows;
    d["steps"] = s.steps;
    d["rows_decoded"] = s.rows_decoded;
    d["mean_rows_per_step"] = s.steps ? double(s.rows_decoded) / double(s.steps) : 0.0;
    d["max_rows"] = s.max_rows;
    d["steps_ahead"] = s.steps_ahead;
    d["prefill_calls"] = s.prefill_calls;
    d["step_ms"] = s.step_ms;
    d["decode_ms"] = s.decode_ms;
    d["prefill_ms"] = s.prefill_ms;
    d["tokens_generated"] = s.tokens_generated;
    d["prompt_tokens"] = s.prompt_tokens;
    d["submitted"] = s.submitted;
    d["finished"] = s.finished;
    d["cancelled"] = s.cancelled;
    d["timed_out"] = s.timed_out;
    d["failed"] = s.failed;
    d["rejected"] = s.rejected;
    d["cache_hits"] = s.cache_hits;
    d["cache_misses"] = s.cache_misses;
    d["cached_tokens"] = s.cached_tokens;
    d["cache_entries"] = s.cache_entries;
    d["cache_bytes"] = s.cache_bytes;
    d["cache_max_bytes"] = s.cache_max_bytes;
    return d;
}

// Wakes an event loop that reads engine sequences (the HTTP server, serve.py): a non-blocking
// pipe it owns, and each request submitted with it (and a key) writes its key, 8 bytes, after
// each delivery (on_ready: tokens readable, or finished). The loop waits on read_fd and polls
// only the keys it reads. Writes of 8 bytes to a pipe are atomic; a full pipe drops the key and
// sets `overflow`, after which the reader polls everything it holds. The pipe closes when the
// Python object and every request's callback are gone, so the engine never writes into a
// descriptor that was closed and reused. No GIL on the engine thread.
struct Notifier {
    int fds[2] = {-1, -1};
    std::atomic<bool> overflow{false};
    Notifier() {
        if (::pipe(fds) != 0) throw Error(str_cat("Notifier: pipe() failed (errno ", errno, ")"));
        for (int fd : fds) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    }
    ~Notifier() {
        for (int fd : fds)
            if (fd >= 0) ::close(fd);
    }
    Notifier(const Notifier&) = delete;
    Notifier& operator=(const Notifier&) = delete;
};

std::function<void()> notify_callback(const std::shared_ptr<Notifier>& n, uint64_t key) {
    if (!n) return nullptr;
    return [n, key]() {
        if (::write(n->fds[1], &key, sizeof key) != ssize_t(sizeof key))
            n->overflow.store(true);
    };
}

py::list logprobs_list(const std::vector<TokenLogprobs>& lps) {
    py::list out;
    for (const TokenLogprobs& t : lps) {
        py::list top;
        for (size_t i = 0; i < t.top_ids.size(); ++i)
            top.append(py::make_tuple(t.top_ids[i], t.top_logprobs[i]));
        out.append(py::make_tuple(t.logprob, top));
    }
    return out;
}

void register_engine_api(py::module_& m) {
    py::register_exception<EngineBusy>(m, "EngineBusy", PyExc_RuntimeError);
    py::class_<Notifier, std::shared_ptr<Notifier>>(m, "Notifier")
        .def(py::init<>())
        .def("fileno", [](const Notifier& n) { return n.fds[0]; },
             "The pipe's read end (non-blocking) to wait on.")
        .def(
            "take_overflow", [](Notifier& n) { return n.overflow.exchange(false); },
            "Whether a key was dropped (a full pipe) since the last call: poll everything.");
    py::class_<EngineSequence, std::shared_ptr<EngineSequence>>(m, "EngineSequence")
        .def(
            "read",
            [](EngineSequence& s, double timeout) -> py::object {
                std::vector<int32_t> out;
                bool more;
                if (timeout == 0.0) {  // a poll: keeps the GIL (the engine thread never takes
                    more = s.read(&out, 0.0);  // it; a release costs a switch interval)
                } else {
                    py::gil_scoped_release release;
                    more = s.read(&out, timeout);
                }
                if (!more && out.empty()) return py::none();
                return py::cast(out);
            },
            py::arg("timeout") = -1.0,
            "Waits for tokens (timeout < 0: without limit; 0: a poll) and returns the unread "
            "ones (possibly an empty list on timeout), or None once finished and every token "
            "was read.")
        .def(
            "read_logprobs",
            [](EngineSequence& s, double timeout) -> py::object {
                std::vector<int32_t> out;
                std::vector<TokenLogprobs> lps;
                bool more;
                if (timeout == 0.0) {
                    more = s.read(&out, 0.0, &lps);
                } else {
                    py::gil_scoped_release release;
                    more = s.read(&out, timeout, &lps);
                }
                if (!more && out.empty()) return py::none();
                return py::make_tuple(out, logprobs_list(lps));
            },
            py::arg("timeout") = -1.0,
            "As read, for a request submitted with logprobs >= 0: -> (tokens, [(logprob, "
            "[(top id, top logprob), ...]) per token]), or None once finished and all was read.")
        .def(
            "wait",
            [](EngineSequence& s, double timeout) {
                py::gil_scoped_release release;
                return s.wait(timeout);
            },
            py::arg("timeout") = -1.0, "Waits until finished; -> whether it has finished.")
        .def("cancel", &EngineSequence::cancel)
        .def("stop",
             [](EngineSequence& s, const std::string& reason) { s.stop(finish_reason_from(reason)); })
        .def_property_readonly("finished", &EngineSequence::finished)
        .def_property_readonly("id", &EngineSequence::id)
        .def_property_readonly("result", &EngineSequence::result)
        .def_property_readonly("error", &EngineSequence::error)
        .def_property_readonly("stop_offset", &EngineSequence::stop_offset)
        .def_property_readonly("final_state", &EngineSequence::final_state)
        .def_property_readonly("prompt_state", &EngineSequence::prompt_state);

    auto gen = py::reinterpret_borrow<py::class_<Generator>>(m.attr("Generator"));
    gen.def(
           "submit",
           [](Generator& g, std::vector<int32_t> prompt, const GenerationOptions& opt,
              std::shared_ptr<SequenceState> start, std::vector<std::string> stops,
              bool keep_states, double timeout, bool block, int32_t logprobs,
              std::shared_ptr<Notifier> notifier, uint64_t key) {
               EngineRequest r;
               r.prompt = std::move(prompt);
               r.start = std::move(start);
               r.opt = opt;
               r.stop_strings = std::move(stops);
               r.keep_states = keep_states;
               r.timeout_s = timeout;
               r.logprobs = logprobs;
               r.on_ready = notify_callback(notifier, key);
               ReleaseGil release;
               return g.engine().submit(std::move(r), block);
           },
           py::arg("prompt"), py::arg("options"), py::arg("state") = nullptr,
           py::arg("stop") = std::vector<std::string>{}, py::arg("keep_states") = false,
           py::arg("timeout") = 0.0, py::arg("block") = true, py::arg("logprobs") = -1,
           py::arg("notifier") = nullptr, py::arg("key") = 0,
           "Queues a request on the engine (started on first use); -> EngineSequence. "
           "block=False raises EngineBusy on a full queue; logprobs >= 0 keeps each token's "
           "logprobs (read_logprobs); notifier: `key` is written to its pipe after each "
           "delivery (tokens readable, or finished).")
        .def(
            "submit_many",
            [](Generator& g, std::vector<std::vector<int32_t>> prompts, py::list options,
               py::handle starts, std::vector<std::string> stops, bool keep_states, bool block,
               int32_t logprobs, std::shared_ptr<Notifier> notifier,
               std::vector<uint64_t> keys) {
                auto st = state_list(starts, prompts.size());
                MAMBART_CHECK_ARG(options.size() == prompts.size(), "got ", options.size(),
                                  " option sets for ", prompts.size(), " prompts");
                MAMBART_CHECK_ARG(!notifier || keys.size() == prompts.size(), "got ",
                                  keys.size(), " notifier keys for ", prompts.size(), " prompts");
                std::vector<EngineRequest> reqs(prompts.size());
                for (size_t i = 0; i < prompts.size(); ++i) {
                    if (!py::isinstance<GenerationOptions>(options[i]))
                        throw py::type_error("options must be a list of GenerationOptions");
                    reqs[i].prompt = std::move(prompts[i]);
                    reqs[i].opt = options[i].cast<const GenerationOptions&>();
                    if (i < st.size()) reqs[i].start = st[i];
                    reqs[i].stop_strings = stops;
                    reqs[i].keep_states = keep_states;
                    reqs[i].logprobs = logprobs;
                    if (notifier) reqs[i].on_ready = notify_callback(notifier, keys[i]);
                }
                ReleaseGil release;
                return g.engine().submit_many(std::move(reqs), block);
            },
            py::arg("prompts"), py::arg("options"), py::arg("states") = py::none(),
            py::arg("stop") = std::vector<std::string>{}, py::arg("keep_states") = false,
            py::arg("block") = true, py::arg("logprobs") = -1, py::arg("notifier") = nullptr,
            py::arg("keys") = std::vector<uint64_t>{},
            "Queues one request per prompt together (one prefill group where they fit); "
            "logprobs as in submit; with a notifier, row i writes keys[i].")
        .def(
            "start_engine",
            [](Generator& g, int64_t capacity, int64_t max_slots, int64_t prefill_rows,
               int64_t prefill_chunk, int64_t max_queue, size_t prompt_cache_bytes) {
                EngineOptions o;
                o.capacity = capacity;
                o.max_slots = max_slots;
                o.prefill_rows = prefill_rows;
                o.prefill_chunk = prefill_chunk;
                o.max_queue = max_queue;
                o.prompt_cache_bytes = prompt_cache_bytes;
                MAMBART_CHECK_ARG(!g.engine_started(), "the engine has already started");
                ReleaseGil release;
                g.engine(&o);
            },
            py::arg("capacity") = 0, py::arg("max_slots") = 0, py::arg("prefill_rows") = 0,
            py::arg("prefill_chunk") = 0, py::arg("max_queue") = 1024,
            py::arg("prompt_cache_bytes") = 0)
        .def_property_readonly("engine_started", &Generator::engine_started)
        .def_property_readonly(
            "fused_projections",
            [](const Generator& g) { return g.model().fused_projections(); },
            "whether decode steps run the fused projections (option fused_projections; every "
            "layer takes them)")
        .def_property_readonly(
            "persistent_decode_steps",
            [](const Generator& g) { return g.model().persistent_steps(); },
            "batch-1 decode forwards recorded or run as the persistent decode kernels (option "
            "cuda_persistent_decode; a CUDA graph records one and replays it)")
        .def("engine_stats",
             [](Generator& g) {
                 if (g.engine_started()) return stats_dict(g.engine().stats());
                 EngineStats s;  // not started: nothing ran; the cache it will use
                 if (const std::shared_ptr<PrefixCache> c = g.prompt_cache())
                     add_cache_stats(*c, &s);
                 return stats_dict(s);
             })
        .def("engine_has_vocab_bytes", [](Generator& g) { return g.engine().has_vocab_bytes(); })
        .def(
            "set_tokenizer_json",
            [](Generator& g, const std::string& text) {
                g.set_token_bytes(TokenBytes::from_json(text, "tokenizer"));
            },
            py::arg("text"), "The vocabulary bytes for stop strings, from tokenizer.json text.");
    m.def(
        "token_bytes",
        [](const std::string& text) {
            TokenBytes t = TokenBytes::from_json(text, "tokenizer");
            py::list out;
            for (int64_t i = 0; i < t.size(); ++i) out.append(py::bytes(t.bytes(int32_t(i))));
            return out;
        },
        py::arg("tokenizer_json"), "Every token's bytes (tests of the engine's stop strings).");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "mambart native core (C++). Use the `mambart` package, not this module directly.";

    // ModelLoadError maps to the one Python class, mambart.errors.ModelLoadError (a ValueError).
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ModelLoadError& e) {
            py::object cls = py::module_::import("mambart.errors").attr("ModelLoadError");
            py::set_error(cls, e.what());
        } catch (const StateError& e) {
            // mambart.StateError (a ValueError). Its message names a file: decoded as the file
            // system does (surrogateescape), so a path that is not UTF-8 comes back as given.
            py::object cls = py::module_::import("mambart.state").attr("StateError");
            PyObject* msg = PyUnicode_DecodeFSDefault(e.what());
            if (!msg) {
                PyErr_Clear();
                py::set_error(cls, e.what());
            } else {
                PyErr_SetObject(cls.ptr(), msg);
                Py_DECREF(msg);
            }
        } catch (const InvalidArgument& e) {
            py::set_error(PyExc_ValueError, e.what());
        } catch (const Unsupported& e) {
            py::set_error(PyExc_NotImplementedError, e.what());
        } catch (const OutOfMemory& e) {
            py::set_error(PyExc_MemoryError, e.what());
        } catch (const Error& e) {
            py::set_error(PyExc_RuntimeError, e.what());
        }
    });

    m.def("cuda_available", &cuda_available, "Whether this build has a usable CUDA backend.");
    m.def(
        "config_spec",
        [](const std::string& text, const std::string& origin, const std::string& state_dtype) {
            ModelConfig c = ModelConfig::from_json_text(text, origin, layer_types());
            c.state_dtype = dtype_from_name(state_dtype, "state_dtype");
            py::list tensors;
            for (const TensorSpec& t : c.tensors()) {
                py::dict e;
                e["name"] = t.name;
                e["shape"] = py::tuple(py::cast(t.shape));
                e["matrix"] = t.matrix;
                e["store_fp32"] = t.store_fp32;
                tensors.append(e);
            }
            py::dict d;
            d["config"] = config_to_dict(c);
            d["tensors"] = tensors;
            d["state"] = state_spec(c);
            d["state_row_bytes"] = State::row_bytes(c);
            d["layer_types"] = layer_type_list(c);
            return d;
        },
        py::arg("text"), py::arg("origin"), py::arg("state_dtype") = "float32",
        "Parses and validates a mambart config.json text with the runtime's reader (errors name "
        "`origin`, the layer and the key) and returns {config, tensors: [{name, shape, matrix, "
        "store_fp32}] in load order, state: the state tensors (with state_dtype, the SSM "
        "states' storage), state_row_bytes: bytes of state per sequence, layer_types}: the one "
        "source of tensor names, used by the converter.");
    m.def("options", [] { refresh_option_environment(); return runtime_options_text(); },
          "The runtime options now (name -> text): explicit settings over the environment.");
    m.def("set_option", &set_runtime_option, py::arg("name"), py::arg("value"),
          "Sets a runtime option from its text form ('' clears the setting); ValueError for an "
          "unknown name or a bad value.");
    m.def("check_option", &check_runtime_option, py::arg("name"), py::arg("value"),
          "The checks of set_option, setting nothing.");
    m.def(
        "option_table",
        [] {
            py::list out;
            for (const OptionInfo& o : option_table()) {
                py::dict d;
                d["name"] = o.name;
                d["env"] = o.env;
                d["kind"] = o.kind;
                d["choices"] = o.choices;
                d["default"] = o.deflt;
                d["help"] = o.help;
                out.append(d);
            }
            return out;
        },
        "Every runtime option: name, env, kind, choices, default, help.");
    m.def("layer_types", [] { return layer_types().names(); },
          "The registered layer types, comma-separated.");
    register_ops(m);

    py::class_<GenerationOptions>(m, "GenerationOptions")
        .def(py::init<>())
        .def_readwrite("max_new_tokens", &GenerationOptions::max_new_tokens)
        .def_readwrite("seed", &GenerationOptions::seed)
        .def_readwrite("stop_token_ids", &GenerationOptions::stop_token_ids)
        .def_readwrite("ignore_eos", &GenerationOptions::ignore_eos)
        .def_property(
            "temperature", [](const GenerationOptions& o) { return o.sampling.temperature; },
            [](GenerationOptions& o, float v) { o.sampling.temperature = v; })
        .def_property(
            "top_k", [](const GenerationOptions& o) { return o.sampling.top_k; },
            [](GenerationOptions& o, int64_t v) { o.sampling.top_k = v; })
        .def_property(
            "top_p", [](const GenerationOptions& o) { return o.sampling.top_p; },
            [](GenerationOptions& o, float v) { o.sampling.top_p = v; })
        .def_property(
            "min_p", [](const GenerationOptions& o) { return o.sampling.min_p; },
            [](GenerationOptions& o, float v) { o.sampling.min_p = v; })
        .def_property(
            "repetition_penalty",
            [](const GenerationOptions& o) { return o.sampling.repetition_penalty; },
            [](GenerationOptions& o, float v) { o.sampling.repetition_penalty = v; });

    py::class_<GenerationResult>(m, "RawResult")
        .def_readonly("token_ids", &GenerationResult::token_ids)
        .def_property_readonly("finish_reason",
                               [](const GenerationResult& r) {
                                   return std::string(finish_reason_name(r.finish_reason));
                               })
        .def_readonly("prompt_tokens", &GenerationResult::prompt_tokens)
        .def_readonly("prefill_ms", &GenerationResult::prefill_ms)
        .def_readonly("decode_ms", &GenerationResult::decode_ms);

    py::class_<GenerationStream>(m, "GenerationStream")
        .def(
            "next",
            [](GenerationStream& s) -> py::object {
                std::vector<std::pair<int64_t, int32_t>> ev;
                bool more;
                {
                    py::gil_scoped_release release;
                    more = s.next(&ev);
                }
                if (!more) return py::none();
                return py::cast(ev);
            },
            "Advances one step; returns a list of (row, token) or None when every row is done.")
        .def("finish_row",
             [](GenerationStream& s, int64_t row, const std::string& reason) {
                 (void)reason;
                 s.finish_row(row, FinishReason::StopToken);
             })
        .def_property_readonly("done", &GenerationStream::done)
        .def_property_readonly("batch", &GenerationStream::batch)
        .def_property_readonly("results", &GenerationStream::results)
        .def_property_readonly(
            "last_logits",
            [](const GenerationStream& s) {
                const std::vector<float>& l = s.last_logits();
                const int64_t B = s.batch(), V = B ? int64_t(l.size()) / B : 0;
                py::array_t<float> out({B, V});
                std::copy(l.begin(), l.end(), out.mutable_data());
                return out;
            },
            "(batch, vocab) float32 copy of the raw logits each row's latest token was sampled from.");

    py::class_<Generator>(m, "Generator")
        .def(py::init([](const std::string& dir, const std::string& device,
                         const std::optional<std::string>& dtype, int threads,
                         const std::optional<std::string>& state_dtype) {
                 auto dt = parse_dtype(dtype);
                 auto sdt = parse_dtype(state_dtype);
                 ReleaseGil release;
                 return std::make_unique<Generator>(dir, device, dt ? &*dt : nullptr, threads,
                                                    sdt ? &*sdt : nullptr);
             }),
             py::arg("model_dir"), py::arg("device") = "cpu", py::arg("dtype") = py::none(),
             py::arg("threads") = 0, py::arg("state_dtype") = py::none())
        .def_property_readonly(
            "state_dtype",
            [](const Generator& g) { return std::string(dtype_name(g.model().state_dtype())); },
            "the SSM states' storage: 'float32' or 'bfloat16' (option state_dtype, issue 18)")
        .def_property_readonly("threads", &Generator::threads)
        .def_property_readonly("config",
                               [](const Generator& g) { return config_to_dict(g.config()); })
        .def_property_readonly("state_spec",
                               [](const Generator& g) { return state_spec(g.config()); })
        .def_property_readonly("layer_type_list",
                               [](const Generator& g) { return layer_type_list(g.config()); })
        .def_property_readonly("device", &Generator::device_name)
        .def_property_readonly("dtype",
                               [](const Generator& g) { return dtype_name(g.model().dtype()); })
        .def(
            "logits",
            [](Generator& g, const std::vector<int32_t>& ids, int64_t chunk) {
                const int64_t V = g.config().vocab_size;
                if (ids.empty()) throw InvalidArgument("token_ids must not be empty");
                g.check_ids(ids, "token_ids");
                py::array_t<float> out({int64_t(ids.size()), V});
                float* p = out.mutable_data();
                {
                    ReleaseGil release;
                    g.logits(ids, p, chunk);
                }
                return out;
            },
            py::arg("token_ids"), py::arg("chunk") = 0)
        .def(
            "start",
            // Arguments are converted by hand and the stream keeps the Generator alive by hand:
            // pybind11's py::keep_alive<0, 1> runs its post-call hook even when argument
            // conversion failed and then segfaults (pybind/pybind11#6154), so a call with
            // wrong argument types would crash the process.
            [](py::object self, py::handle prompts, py::handle options) {
                Generator& g = self.cast<Generator&>();
                std::vector<std::vector<int32_t>> p;
                try {
                    p = prompts.cast<std::vector<std::vector<int32_t>>>();
                } catch (const py::cast_error&) {
                    throw py::type_error("prompts must be a list of lists of int32 token ids");
                }
                if (!py::isinstance<GenerationOptions>(options))
                    throw py::type_error("options must be a GenerationOptions");
                const GenerationOptions& opt = options.cast<const GenerationOptions&>();
                py::object stream = py::cast(g.start(p, opt));
                py::detail::keep_alive_impl(stream, self);  // the stream keeps `self` alive
                return stream;
            },
            py::arg("prompts"), py::arg("options"))
        .def(
            "generate",
            [](Generator& g, const std::vector<std::vector<int32_t>>& prompts,
               const GenerationOptions& opt) {
                ReleaseGil release;
                return g.generate(prompts, opt);
            },
            py::arg("prompts"), py::arg("options"));

    // ---- test-only entry points ----
    m.def(
        "inspect_safetensors",
        [](const std::string& path) {
            SafetensorsFile f(path);
            py::dict d;
            for (const auto& kv : f.tensors())
                d[py::str(kv.first)] = py::make_tuple(std::string(dtype_name(kv.second.dtype)),
                                                      py::tuple(py::cast(kv.second.shape)));
            return d;
        },
        py::arg("path"), "Validates a safetensors file; returns {name: (dtype, shape)}.");
    m.def(
        "sampling_probs",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> logits,
           float temperature, int64_t top_k, float top_p, float min_p, float repetition_penalty,
           const std::vector<int32_t>& previous_tokens) {
            std::vector<float> l = logits_vector(logits);
            SamplingOptions o = make_sampling(temperature, top_k, top_p, min_p, repetition_penalty);
            Sampler s(int64_t(l.size()));
            for (int32_t t : previous_tokens) s.observe(t);
            py::array_t<float> out(int64_t(l.size()));
            s.probs(l.data(), o, out.mutable_data());
            return out;
        },
        py::arg("logits"), py::arg("temperature") = 1.0f, py::arg("top_k") = 0,
        py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f,
        py::arg("previous_tokens") = std::vector<int32_t>{});
    m.def(
        "sample_token",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> logits,
           float temperature, int64_t top_k, float top_p, float min_p, float repetition_penalty,
           const std::vector<int32_t>& previous_tokens, uint64_t seed, uint64_t counter) {
            std::vector<float> l = logits_vector(logits);
            SamplingOptions o = make_sampling(temperature, top_k, top_p, min_p, repetition_penalty);
            Sampler s(int64_t(l.size()));
            for (int32_t t : previous_tokens) s.observe(t);
            return s.sample(l.data(), o, seed, 0, counter);
        },
        py::arg("logits"), py::arg("temperature") = 1.0f, py::arg("top_k") = 0,
        py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f,
        py::arg("previous_tokens") = std::vector<int32_t>{}, py::arg("seed") = 0,
        py::arg("counter") = 0);

    register_state_api(m);  // issue 7
    register_engine_api(m);  // issue 14
    register_state_files(m);  // issue 14: state files, the prompt cache (states.cpp)
    register_speculative_api(m);  // issue 25 (speculative.cpp)
}
