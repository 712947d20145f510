// The C API (capi/mambart.h) over the C++ runtime: handles checked against a registry of live
// ones before any use, every C++ exception turned into a status and a message.
#include "mambart.h"

#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_set>
#include <vector>

#include "engine.h"
#include "error.h"
#include "options.h"
#include "generator.h"
#include "layers/registry.h"
#include "state_file.h"

#ifndef MAMBART_VERSION_STRING
#define MAMBART_VERSION_STRING "0.0.0"
#endif

using namespace mambart;

namespace {

constexpr uint64_t kModelMagic = 0x4d414d4241524d31ull;    // "MAMBARM1"
constexpr uint64_t kRequestMagic = 0x4d414d4241525231ull;  // "MAMBARR1"
constexpr uint64_t kStateMagic = 0x4d414d4241525331ull;    // "MAMBARS1"

thread_local std::string tl_error;

// Live handles: a pointer is dereferenced only while it is in this set (a freed or foreign
// pointer is reported, never read).
std::mutex g_handles_mu;
std::unordered_set<const void*>& handles() {
    static std::unordered_set<const void*> h;
    return h;
}
void register_handle(const void* p) {
    std::lock_guard<std::mutex> lk(g_handles_mu);
    handles().insert(p);
}
bool unregister_handle(const void* p) {
    std::lock_guard<std::mutex> lk(g_handles_mu);
    return handles().erase(p) != 0;
}
bool is_live(const void* p) {
    if (!p) return false;
    std::lock_guard<std::mutex> lk(g_handles_mu);
    return handles().count(p) != 0;
}

struct HandleError {
    mutable std::mutex mu;
    std::string text;
    void set(const std::string& s) {
        std::lock_guard<std::mutex> lk(mu);
        text = s;
    }
};

// Runs f, mapping exceptions to statuses; the message goes to this thread's last error and to
// the handle's error (when given).
template <typename F>
mambart_status guarded(HandleError* he, F&& f) {
    mambart_status st = MAMBART_OK;
    std::string msg;
    try {
        st = f();
    } catch (const EngineBusy& e) {
        st = MAMBART_ERR_BUSY;
        msg = e.what();
    } catch (const OutOfMemory& e) {
        st = MAMBART_ERR_OUT_OF_MEMORY;
        msg = e.what();
    } catch (const InvalidArgument& e) {
        st = MAMBART_ERR_INVALID_ARGUMENT;
        msg = e.what();
    } catch (const ModelLoadError& e) {
        st = MAMBART_ERR_MODEL_LOAD;
        msg = e.what();
    } catch (const StateError& e) {
        st = MAMBART_ERR_STATE;
        msg = e.what();
    } catch (const Unsupported& e) {
        st = MAMBART_ERR_UNSUPPORTED;
        msg = e.what();
    } catch (const std::bad_alloc&) {
        st = MAMBART_ERR_OUT_OF_MEMORY;
        msg = "out of memory";
    } catch (const std::exception& e) {
        st = MAMBART_ERR_RUNTIME;
        msg = e.what();
    } catch (...) {
        st = MAMBART_ERR_RUNTIME;
        msg = "unknown error";
    }
    if (st != MAMBART_OK && msg.empty()) msg = tl_error;
    tl_error = st == MAMBART_OK ? std::string() : msg;
    if (he) he->set(tl_error);
    return st;
}

mambart_status fail(mambart_status st, const std::string& msg) {
    tl_error = msg;
    return st;
}

}  // namespace

struct mambart_model {
    uint64_t magic = kModelMagic;
    std::unique_ptr<Generator> g;
    std::shared_ptr<const StateIdentity> id;  // what its state files record
    HandleError err;
};

struct mambart_request {
    uint64_t magic = kRequestMagic;
    mambart_model* model = nullptr;
    std::shared_ptr<EngineSequence> seq;
    std::mutex mu;                  // leftover
    std::vector<int32_t> leftover;  // read from the sequence, not yet copied out
    HandleError err;
};

struct mambart_state {
    uint64_t magic = kStateMagic;
    const mambart_model* model = nullptr;  // the model it belongs to
    std::shared_ptr<const StateIdentity> id;  // the model's identity, for saving
    std::shared_ptr<SequenceState> s;
};

namespace {
bool model_ok(const mambart_model* m) { return is_live(m) && m->magic == kModelMagic; }
bool request_ok(const mambart_request* r) { return is_live(r) && r->magic == kRequestMagic; }
bool state_ok(const mambart_state* s) { return is_live(s) && s->magic == kStateMagic; }
mambart_status bad_handle(const char* what) {
    return fail(MAMBART_ERR_HANDLE, str_cat(what, " is NULL, freed or not a ", what, " handle"));
}
mambart_finish finish_code(FinishReason r) {
    switch (r) {
        case FinishReason::Length: return MAMBART_FINISH_LENGTH;
        case FinishReason::Eos: return MAMBART_FINISH_EOS;
        case FinishReason::StopToken: return MAMBART_FINISH_STOP_TOKEN;
        case FinishReason::StopString: return MAMBART_FINISH_STOP_STRING;
        case FinishReason::Cancelled: return MAMBART_FINISH_CANCELLED;
        case FinishReason::Timeout: return MAMBART_FINISH_TIMEOUT;
        case FinishReason::Error: return MAMBART_FINISH_ERROR;
        case FinishReason::None: break;
    }
    return MAMBART_FINISH_NONE;
}
std::shared_ptr<const SequenceState> start_of(const mambart_model* m, const mambart_state* s) {
    if (!s) return nullptr;
    if (!state_ok(s)) throw InvalidArgument("start is a freed or foreign state handle");
    if (s->model != m)
        throw InvalidArgument("start is a state of another model handle (states belong to the "
                              "model that made them)");
    return s->s;
}
}  // namespace

extern "C" {

const char* mambart_version(void) { return MAMBART_VERSION_STRING; }
int mambart_c_api_version(void) { return MAMBART_C_API_VERSION; }
const char* mambart_last_error(void) { return tl_error.c_str(); }

const char* mambart_status_name(mambart_status s) {
    switch (s) {
        case MAMBART_OK: return "MAMBART_OK";
        case MAMBART_ERR_INVALID_ARGUMENT: return "MAMBART_ERR_INVALID_ARGUMENT";
        case MAMBART_ERR_MODEL_LOAD: return "MAMBART_ERR_MODEL_LOAD";
        case MAMBART_ERR_UNSUPPORTED: return "MAMBART_ERR_UNSUPPORTED";
        case MAMBART_ERR_BUSY: return "MAMBART_ERR_BUSY";
        case MAMBART_ERR_OUT_OF_MEMORY: return "MAMBART_ERR_OUT_OF_MEMORY";
        case MAMBART_ERR_HANDLE: return "MAMBART_ERR_HANDLE";
        case MAMBART_ERR_STATE: return "MAMBART_ERR_STATE";
        case MAMBART_ERR_RUNTIME: return "MAMBART_ERR_RUNTIME";
    }
    return "MAMBART_ERR_UNKNOWN";
}

void mambart_load_options_init(mambart_load_options* o) {
    if (!o) return;
    std::memset(o, 0, sizeof(*o));
    o->struct_size = sizeof(*o);
    o->device = "cpu";
}

mambart_status mambart_model_load(const char* model_dir, const mambart_load_options* options,
                                  mambart_model** out) {
    return guarded(nullptr, [&] {
        MAMBART_CHECK_ARG(out, "out is NULL");
        *out = nullptr;
        MAMBART_CHECK_ARG(model_dir && *model_dir, "model_dir is NULL or empty");
        // The MAMBART_* variables are read here, on the caller's thread (cpp/options.h); the
        // model's threads use what was read.
        refresh_option_environment();
        mambart_load_options o;
        mambart_load_options_init(&o);
        if (options) {
            MAMBART_CHECK_ARG(options->struct_size == sizeof(mambart_load_options),
                              "options.struct_size is ", options->struct_size, ", expected ",
                              sizeof(mambart_load_options),
                              " (call mambart_load_options_init first)");
            o = *options;
        }
        MAMBART_CHECK_ARG(o.max_slots >= 0 && o.max_queue >= 0,
                          "options.max_slots and options.max_queue must be >= 0");
        MAMBART_CHECK_ARG(o.prompt_cache_bytes <= (size_t(1) << 62),
                          "options.prompt_cache_bytes is ", o.prompt_cache_bytes,
                          ", more than any memory (0 turns the prompt cache off)");
        std::unique_ptr<DType> dt;
        if (o.dtype) {
            const std::string d = o.dtype;
            MAMBART_CHECK_ARG(d == "float32" || d == "float16" || d == "bfloat16",
                              "options.dtype must be NULL, \"float32\", \"float16\" or "
                              "\"bfloat16\", got \"", d, "\"");
            dt = std::make_unique<DType>(dtype_from_name(d, "options.dtype"));
        }
        auto m = std::make_unique<mambart_model>();
        m->g = std::make_unique<Generator>(model_dir, o.device ? o.device : "cpu", dt.get());
        m->id = std::make_shared<StateIdentity>(m->g->state_identity());
        EngineOptions eo;
        eo.max_slots = o.max_slots;
        if (o.max_queue > 0) eo.max_queue = o.max_queue;
        eo.prompt_cache_bytes = o.prompt_cache_bytes;
        m->g->engine(&eo);
        register_handle(m.get());
        *out = m.release();
        return MAMBART_OK;
    });
}

void mambart_model_free(mambart_model* m) {
    if (!model_ok(m) || !unregister_handle(m)) return;
    m->magic = 0;
    delete m;
}

const char* mambart_model_error(const mambart_model* m) {
    if (!model_ok(m)) return "the model handle is NULL or freed";
    std::lock_guard<std::mutex> lk(m->err.mu);
    return m->err.text.c_str();
}

int64_t mambart_model_vocab_size(const mambart_model* m) {
    return model_ok(m) ? m->g->config().vocab_size : -1;
}

int32_t mambart_model_eos_token_id(const mambart_model* m) {
    return model_ok(m) ? int32_t(m->g->config().eos_token_id) : -1;
}

const char* mambart_token_bytes(mambart_model* m, int32_t id, size_t* len) {
    if (len) *len = 0;
    if (!model_ok(m)) return nullptr;
    const TokenBytes& t = m->g->engine().vocab_bytes();
    if (t.empty() || id < 0 || id >= t.size()) return nullptr;
    const std::string& b = t.bytes(id);
    if (len) *len = b.size();
    return b.data();
}

mambart_status mambart_model_stats(mambart_model* m, mambart_stats* out) {
    if (!model_ok(m)) return bad_handle("model");
    return guarded(&m->err, [&] {
        MAMBART_CHECK_ARG(out, "out is NULL");
        const EngineStats s = m->g->engine().stats();
        *out = mambart_stats{s.running,      s.prefilling,      s.queued,        s.slots,
                             s.steps,        s.rows_decoded,    s.tokens_generated,
                             s.submitted,    s.finished,        s.cancelled,     s.rejected,
                             s.cache_hits,   s.cache_misses,    s.cached_tokens, s.prompt_tokens,
                             s.cache_entries, s.cache_bytes,    s.cache_max_bytes};
        return MAMBART_OK;
    });
}

void mambart_request_options_init(mambart_request_options* o) {
    if (!o) return;
    std::memset(o, 0, sizeof(*o));
    o->struct_size = sizeof(*o);
    o->max_new_tokens = 64;
    o->top_p = 1.0f;
    o->repetition_penalty = 1.0f;
}

mambart_status mambart_submit(mambart_model* m, const int32_t* prompt, size_t n,
                              const mambart_state* start, const mambart_request_options* options,
                              mambart_request** out) {
    if (!model_ok(m)) return bad_handle("model");
    return guarded(&m->err, [&] {
        MAMBART_CHECK_ARG(out, "out is NULL");
        *out = nullptr;
        MAMBART_CHECK_ARG(prompt || n == 0, "prompt is NULL but n is ", n);
        if (start && !state_ok(start))
            return fail(MAMBART_ERR_HANDLE, "start is a freed or foreign state handle");
        if (start && start->model != m)
            return fail(MAMBART_ERR_STATE, "start is a state of another model (states belong to "
                                           "the model handle that made them)");
        mambart_request_options o;
        mambart_request_options_init(&o);
        if (options) {
            MAMBART_CHECK_ARG(options->struct_size == sizeof(mambart_request_options),
                              "options.struct_size is ", options->struct_size, ", expected ",
                              sizeof(mambart_request_options),
                              " (call mambart_request_options_init first)");
            o = *options;
        }
        MAMBART_CHECK_ARG(o.stop_token_ids || o.n_stop_token_ids == 0,
                          "options.stop_token_ids is NULL but n_stop_token_ids is ",
                          o.n_stop_token_ids);
        MAMBART_CHECK_ARG(o.stop_strings || o.n_stop_strings == 0,
                          "options.stop_strings is NULL but n_stop_strings is ", o.n_stop_strings);
        EngineRequest req;
        req.prompt.assign(prompt, prompt + n);
        req.start = start_of(m, start);
        req.opt.max_new_tokens = o.max_new_tokens;
        req.opt.sampling.temperature = o.temperature;
        req.opt.sampling.top_k = o.top_k;
        req.opt.sampling.top_p = o.top_p;
        req.opt.sampling.min_p = o.min_p;
        req.opt.sampling.repetition_penalty = o.repetition_penalty;
        req.opt.seed = o.seed;
        req.opt.rng_stream = 0;
        req.opt.stop_token_ids.assign(o.stop_token_ids, o.stop_token_ids + o.n_stop_token_ids);
        for (size_t i = 0; i < o.n_stop_strings; ++i) {
            MAMBART_CHECK_ARG(o.stop_strings[i], "options.stop_strings[", i, "] is NULL");
            req.stop_strings.emplace_back(o.stop_strings[i]);
        }
        req.opt.ignore_eos = o.ignore_eos != 0;
        req.timeout_s = o.timeout_s;
        req.keep_states = o.keep_state != 0;
        if (o.on_tokens) {
            mambart_token_callback cb = o.on_tokens;
            void* user = o.user;
            req.on_tokens = [cb, user](const int32_t* t, size_t k, bool fin) {
                cb(user, t, k, fin ? 1 : 0);
            };
        }
        auto r = std::make_unique<mambart_request>();
        r->model = m;
        r->seq = m->g->engine().submit(std::move(req), false);
        register_handle(r.get());
        *out = r.release();
        return MAMBART_OK;
    });
}

mambart_status mambart_request_read(mambart_request* r, int32_t* buf, size_t cap, size_t* n,
                                    double timeout_s, int* finished) {
    if (!request_ok(r)) return bad_handle("request");
    return guarded(&r->err, [&] {
        MAMBART_CHECK_ARG(n && finished, "n and finished must not be NULL");
        MAMBART_CHECK_ARG(buf || cap == 0, "buf is NULL but cap is ", cap);
        *n = 0;
        *finished = 0;
        std::lock_guard<std::mutex> lk(r->mu);
        if (r->leftover.empty()) r->seq->read(&r->leftover, timeout_s);
        const size_t k = std::min(cap, r->leftover.size());
        std::copy(r->leftover.begin(), r->leftover.begin() + int64_t(k), buf);
        r->leftover.erase(r->leftover.begin(), r->leftover.begin() + int64_t(k));
        *n = k;
        // Finished once the sequence has ended and every token was copied out. finished() is
        // read first: the engine hands over a request's tokens before marking it finished.
        const bool ended = r->seq->finished();
        if (r->leftover.empty()) r->seq->read(&r->leftover, 0.0);
        *finished = ended && r->leftover.empty() ? 1 : 0;
        return MAMBART_OK;
    });
}

mambart_status mambart_request_wait(mambart_request* r, double timeout_s, int* finished) {
    if (!request_ok(r)) return bad_handle("request");
    return guarded(&r->err, [&] {
        MAMBART_CHECK_ARG(finished, "finished is NULL");
        *finished = r->seq->wait(timeout_s) ? 1 : 0;
        return MAMBART_OK;
    });
}

mambart_status mambart_request_cancel(mambart_request* r) {
    if (!request_ok(r)) return bad_handle("request");
    r->seq->cancel();
    return MAMBART_OK;
}

mambart_status mambart_request_result(mambart_request* r, mambart_result* out) {
    if (!request_ok(r)) return bad_handle("request");
    return guarded(&r->err, [&] {
        MAMBART_CHECK_ARG(out, "out is NULL");
        std::memset(out, 0, sizeof(*out));
        MAMBART_CHECK_ARG(r->seq->finished(), "the request has not finished yet");
        const GenerationResult res = r->seq->result();
        out->finish_reason = finish_code(res.finish_reason);
        out->n_tokens = res.token_ids.size();
        out->prompt_tokens = res.prompt_tokens;
        out->prefill_tokens = res.prefill_tokens;
        out->prefill_ms = res.prefill_ms;
        out->decode_ms = res.decode_ms;
        const std::string e = r->seq->error();
        if (!e.empty()) throw Error(e);
        return MAMBART_OK;
    });
}

mambart_status mambart_request_tokens(mambart_request* r, int32_t* buf, size_t cap, size_t* n) {
    if (!request_ok(r)) return bad_handle("request");
    return guarded(&r->err, [&] {
        MAMBART_CHECK_ARG(n, "n is NULL");
        MAMBART_CHECK_ARG(buf || cap == 0, "buf is NULL but cap is ", cap);
        MAMBART_CHECK_ARG(r->seq->finished(), "the request has not finished yet");
        const GenerationResult res = r->seq->result();
        *n = std::min(cap, res.token_ids.size());
        std::copy(res.token_ids.begin(), res.token_ids.begin() + int64_t(*n), buf);
        return MAMBART_OK;
    });
}

mambart_status mambart_request_state(mambart_request* r, mambart_state** out) {
    if (!request_ok(r)) return bad_handle("request");
    return guarded(&r->err, [&] {
        MAMBART_CHECK_ARG(out, "out is NULL");
        *out = nullptr;
        MAMBART_CHECK_ARG(r->seq->finished(), "the request has not finished yet");
        std::shared_ptr<SequenceState> s = r->seq->final_state();
        MAMBART_CHECK_ARG(s, "the request kept no state (submit it with keep_state = 1)");
        auto h = std::make_unique<mambart_state>();
        h->model = r->model;
        h->id = r->model->id;
        h->s = std::move(s);
        register_handle(h.get());
        *out = h.release();
        return MAMBART_OK;
    });
}

const char* mambart_request_error(const mambart_request* r) {
    if (!request_ok(r)) return "the request handle is NULL or freed";
    std::lock_guard<std::mutex> lk(r->err.mu);
    return r->err.text.c_str();
}

void mambart_request_free(mambart_request* r) {
    if (!request_ok(r) || !unregister_handle(r)) return;
    r->seq->cancel();
    r->magic = 0;
    delete r;
}

mambart_status mambart_prefill(mambart_model* m, const int32_t* prompt, size_t n,
                               const mambart_state* from, mambart_state** out) {
    if (!model_ok(m)) return bad_handle("model");
    return guarded(&m->err, [&] {
        MAMBART_CHECK_ARG(out, "out is NULL");
        *out = nullptr;
        MAMBART_CHECK_ARG(prompt || n == 0, "prompt is NULL but n is ", n);
        if (from && !state_ok(from))
            return fail(MAMBART_ERR_HANDLE, "from is a freed or foreign state handle");
        if (from && from->model != m)
            return fail(MAMBART_ERR_STATE, "from is a state of another model (states belong to "
                                           "the model handle that made them)");
        std::vector<int32_t> ids(prompt, prompt + n);
        auto h = std::make_unique<mambart_state>();
        h->model = m;
        h->id = m->id;
        h->s = m->g->prefill(ids, from ? from->s.get() : nullptr);
        register_handle(h.get());
        *out = h.release();
        return MAMBART_OK;
    });
}

int64_t mambart_state_num_tokens(const mambart_state* s) {
    return state_ok(s) ? int64_t(s->s->tokens.size()) : -1;
}

void mambart_state_free(mambart_state* s) {
    if (!state_ok(s) || !unregister_handle(s)) return;
    s->magic = 0;
    delete s;
}

mambart_status mambart_state_save(const mambart_state* s, const char* path) {
    if (!state_ok(s)) return bad_handle("state");
    return guarded(nullptr, [&] {
        MAMBART_CHECK_ARG(path && *path, "path is NULL or empty");
        write_state_file(path, state_file_of(*s->s, *s->id));
        return MAMBART_OK;
    });
}

mambart_status mambart_state_load(mambart_model* m, const char* path, mambart_state** out) {
    if (!model_ok(m)) return bad_handle("model");
    return guarded(&m->err, [&] {
        MAMBART_CHECK_ARG(out, "out is NULL");
        *out = nullptr;
        MAMBART_CHECK_ARG(path && *path, "path is NULL or empty");
        const StateFile f = read_state_file(path, layer_types());
        auto h = std::make_unique<mambart_state>();
        h->model = m;
        h->id = m->id;
        h->s = m->g->state_from_file(f, path);
        register_handle(h.get());
        *out = h.release();
        return MAMBART_OK;
    });
}

}  // extern "C"
