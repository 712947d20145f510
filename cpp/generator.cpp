#include "generator.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "engine.h"
#include "error.h"
#include "footprint.h"
#include "options.h"
#include "prefix_cache.h"
#include "regular_file.h"
#include "strict_json.h"
#include "token_bytes.h"

namespace mambart {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}
}  // namespace

const char* finish_reason_name(FinishReason r) {
    switch (r) {
        case FinishReason::Length: return "length";
        case FinishReason::Eos: return "eos";
        case FinishReason::StopToken: return "stop_token";
        case FinishReason::StopString: return "stop_string";
        case FinishReason::Cancelled: return "cancelled";
        case FinishReason::Timeout: return "timeout";
        case FinishReason::Error: return "error";
        case FinishReason::None: break;
    }
    return "none";
}

std::vector<PrefillCall> plan_prefill(const std::vector<int64_t>& lens, int64_t chunk) {
    std::vector<PrefillCall> plan;
    const int64_t n = int64_t(lens.size());
    if (n == 0) return plan;
    auto len = [&](int64_t i) { return lens[size_t(i)]; };
    for (int64_t pos = 0, nk = n; nk > 0 && pos < len(0);) {
        while (len(nk - 1) <= pos) --nk;  // rows whose feed has ended drop out
        const int64_t seg = std::min(len(nk - 1) - pos, std::max<int64_t>(1, chunk / nk));
        plan.push_back(PrefillCall{nk, pos, seg});
        pos += seg;
    }
    return plan;
}

// ---- Generator -------------------------------------------------------------------------------

Generator::Generator(const std::string& model_dir, const std::string& device, const DType* dtype,
                     int threads, const DType* state_dtype) {
    (void)runtime_options();  // a bad option value is refused here, naming it
    MAMBART_CHECK_ARG(threads >= 0 && threads <= kMaxThreads, "threads must be an integer from 1 to ",
                      kMaxThreads, " (or None: the cpu_threads option, else the cores this "
                      "process may run on), got ", threads);
    std::shared_ptr<Backend> backend = make_backend(device, threads);
    model_ = std::make_unique<Model>(model_dir, std::move(backend), dtype, state_dtype);
    model_dir_ = model_dir;
}

Generator::~Generator() { engine_.reset(); }  // the engine thread stops before the model goes

bool Generator::engine_started() const {
    std::lock_guard<std::mutex> lk(engine_mu_);
    return engine_ != nullptr;
}

void Generator::set_token_bytes(TokenBytes bytes) {
    std::lock_guard<std::mutex> lk(engine_mu_);
    MAMBART_CHECK_ARG(!engine_, "the vocabulary bytes must be set before the engine starts");
    token_bytes_ = std::make_unique<TokenBytes>(std::move(bytes));
}

Engine& Generator::engine(const EngineOptions* opt) {
    std::lock_guard<std::mutex> lk(engine_mu_);
    if (!engine_) {
        TokenBytes vocab;
        if (token_bytes_) {
            vocab = std::move(*token_bytes_);
            token_bytes_.reset();
        } else {
            const std::string tok = model_dir_ + "/tokenizer.json";
            struct stat st {};
            if (::stat(tok.c_str(), &st) == 0 && S_ISREG(st.st_mode)) vocab = TokenBytes::from_file(tok);
        }
        engine_ = std::make_unique<Engine>(*this, opt ? *opt : EngineOptions{}, std::move(vocab));
        // A cache set before the engine started wins over one made from its options.
        if (prompt_cache_)
            engine_->set_prompt_cache(prompt_cache_);
        else
            prompt_cache_ = engine_->prompt_cache();
    }
    return *engine_;
}

void Generator::set_prompt_cache(std::shared_ptr<PrefixCache> cache) {
    if (cache) (void)prompt_cache_key();  // the fingerprint: a model whose files went fails here
    std::lock_guard<std::mutex> lk(engine_mu_);
    prompt_cache_ = cache;
    if (engine_) engine_->set_prompt_cache(std::move(cache));
}

std::shared_ptr<PrefixCache> Generator::prompt_cache() const {
    std::lock_guard<std::mutex> lk(engine_mu_);
    return prompt_cache_;
}

std::string Generator::prompt_cache_key() const {
    // A bf16 state (option state_dtype) is another key: its entries are bf16 states.
    const DType st = model_->state_dtype();
    return str_cat(fingerprint(), "/", dtype_name(model_->dtype()), "/", device_name(),
                   st == DType::F32 ? "" : str_cat("/state_", dtype_name(st)));
}

void Generator::check_ids(const std::vector<int32_t>& ids, const std::string& what) const {
    const int64_t V = config().vocab_size;
    for (size_t i = 0; i < ids.size(); ++i)
        if (ids[i] < 0 || ids[i] >= V)
            throw InvalidArgument(str_cat(what, "[", i, "] = ", ids[i],
                                          " is outside the vocabulary [0, ", V, ")"));
}

void Generator::check_context(int64_t tokens, const std::string& what) const {
    const int64_t m = config().max_context();
    if (m > 0 && tokens > m)
        throw InvalidArgument(str_cat(what, " needs ", tokens,
                                      " tokens of context, but this model's attention layers "
                                      "hold at most max_context = ", m,
                                      " (the attention layers' config; mambart convert "
                                      "--max-context sets it)"));
}

void Generator::prefill_row(State& st, int64_t row, const std::vector<int32_t>& ids,
                            float* last_logits, float* all_logits, int64_t chunk,
                            const SequenceState* from) {
    Model& m = *model_;
    Backend& be = m.backend();
    const int64_t V = config().vocab_size;
    const int64_t n = int64_t(ids.size());
    // All-logits prefill runs in chunks the logits workspace holds; otherwise in big chunks.
    const int64_t max_chunk = all_logits ? Model::kLogitsRows : m.prefill_chunk();
    chunk = chunk > 0 ? std::min(chunk, max_chunk) : max_chunk;
    m.reserve(std::min(chunk, n), Model::kLogitsRows);
    if (from) {
        restore_row(st, row, *from);
        if (n == 0 && last_logits) {  // nothing to feed: the state's own next-token logits
            MAMBART_CHECK_ARG(int64_t(from->logits.size()) == V,
                              "the state has pending tokens but none were given to feed");
            std::copy(from->logits.begin(), from->logits.end(), last_logits);
        }
    } else {
        st.reset_row(row);
    }
    for (int64_t off = 0; off < n; off += chunk) {
        const int64_t L = std::min(chunk, n - off);
        const bool last_chunk = off + L == n;
        be.copy_to_device(m.ids_buffer(), ids.data() + off, size_t(L) * sizeof(int32_t));
        const LogitsMode mode = all_logits ? LogitsMode::All
                                : last_chunk && last_logits ? LogitsMode::Last
                                                            : LogitsMode::None;
        const float* lg = m.forward(st, row, 1, L, m.ids_buffer(), mode);
        if (mode == LogitsMode::All)
            be.copy_to_host(all_logits + off * V, lg, size_t(L * V) * sizeof(float));
        else if (mode == LogitsMode::Last)
            be.copy_to_host(last_logits, lg, size_t(V) * sizeof(float));
    }
}

// ---- issue 7: states, per-row options, scoring ----

void Generator::check_state(const SequenceState& s, const std::string& what) const {
    const ModelConfig& c = config();
    MAMBART_CHECK_ARG(s.state && s.state->batch() == 1 && s.state->n_layer() == c.n_layer,
                      what, ": the state does not fit this model (different n_layer)");
    const std::vector<State::Slot> want = State::layout(c);
    const std::vector<State::Slot>& got = s.state->slots();
    for (size_t i = 0; i < std::max(want.size(), got.size()); ++i) {
        MAMBART_CHECK_ARG(i < want.size() && i < got.size() && want[i].name == got[i].name &&
                              want[i].shape == got[i].shape && want[i].layers == got[i].layers,
                          what, ": the state does not fit this model (state tensor '",
                          i < got.size() ? got[i].name : want[i].name, "' differs)");
    }
    check_ids(s.tokens, what + ".tokens");
    MAMBART_CHECK_ARG(s.fed >= 0 && s.fed <= int64_t(s.tokens.size()), what, ": fed = ", s.fed,
                      " outside [0, ", s.tokens.size(), "]");
    MAMBART_CHECK_ARG(s.pending() > 0 || int64_t(s.logits.size()) == c.vocab_size, what,
                      ": a state with no pending tokens needs its ", c.vocab_size,
                      " next-token logits, got ", s.logits.size());
}

void Generator::restore_row(State& st, int64_t row, const SequenceState& from) {
    if (&from.state->backend() == &st.backend() && from.state->same_layout(st)) {
        st.copy_row_from(*from.state, 0, row);
        return;
    }
    // Another backend (e.g. a CPU state continued on CUDA) or another state_dtype (a generator
    // loaded with the other option): through the host, converted (bf16 -> fp32 exactly, fp32 ->
    // bf16 rounded to nearest even).
    st.row_from_host(row, from.state->row_to_host(0));
}

std::vector<std::vector<float>> Generator::state_to_host(const SequenceState& s) const {
    return s.state->row_to_host(0);
}

// ---- issue 14: state files ----

const std::string& Generator::fingerprint() const {
    std::call_once(fingerprint_once_, [&] { fingerprint_ = model_fingerprint(model_dir_); });
    return fingerprint_;
}

StateIdentity Generator::state_identity() const {
    StateIdentity id;
    id.fingerprint = fingerprint();
    id.dtype = dtype_name(model_->dtype());
    id.architecture = config().architecture;
    id.has_layer_types = true;
    for (const auto& l : config().layers) id.layer_types.push_back(l->type());
    return id;
}

StateFile state_file_of(const SequenceState& s, const StateIdentity& id) {
    StateFile f;
    f.model = id;
    f.version = id.has_layer_types ? "2" : "1";
    std::vector<std::vector<float>> host = s.state->row_to_host(0);
    const std::vector<State::Slot>& slots = s.state->slots();
    for (size_t i = 0; i < slots.size(); ++i) {
        StateTensor t;
        t.name = slots[i].name;
        t.shape.push_back(int64_t(slots[i].layers.size()));
        t.shape.insert(t.shape.end(), slots[i].shape.begin(), slots[i].shape.end());
        t.layers = slots[i].layers;
        t.bf16 = slots[i].dtype == DType::BF16;
        t.data = std::move(host[i]);
        f.tensors.push_back(std::move(t));
    }
    f.tokens = s.tokens;
    f.fed = s.fed;
    if (s.pending() == 0) f.logits = s.logits;
    f.has_rng = s.has_rng;
    f.seed = s.seed;
    f.stream = s.stream;
    f.counter = s.counter;
    return f;
}

namespace {
std::string tuple_text(const std::vector<int64_t>& v) {  // Python's tuple repr: (2, 3) or (5,)
    std::string out = "(";
    for (size_t i = 0; i < v.size(); ++i) out += str_cat(i ? ", " : "", v[i]);
    return out + (v.size() == 1 ? ",)" : ")");
}
}  // namespace

std::shared_ptr<SequenceState> Generator::state_from_file(const StateFile& f,
                                                          const std::string& source,
                                                          bool check_identity) {
    const StateIdentity me = state_identity();
    const StateIdentity& it = f.model;
    const std::string where = source.empty() ? "" : str_cat(" (loaded from ", source, ")");
    if (check_identity && it.fingerprint != me.fingerprint)
        throw StateError(str_cat("state", where, " belongs to another model (fingerprint ",
                                 printable_ascii(it.fingerprint.substr(0, 12)),
                                 "..., this model ", me.fingerprint.substr(0, 12), "... in ",
                                 model_dir_, ")"));
    if (check_identity && it.dtype != me.dtype)
        throw StateError(str_cat("state", where, " was made with dtype ",
                                 printable_ascii(it.dtype), ", this generator runs ", me.dtype));
    if (check_identity && it.architecture != me.architecture)
        throw StateError(str_cat("state", where, " names architecture '",
                                 printable_ascii(it.architecture), "', this model is '",
                                 me.architecture, "'"));
    const std::string misfit = ": the state and the model do not fit";
    if (it.has_layer_types && it.layer_types != me.layer_types) {
        if (it.layer_types.size() != me.layer_types.size())
            throw StateError(str_cat(source, ": the state has ", it.layer_types.size(),
                                     " layers, this model ", me.layer_types.size(), misfit));
        size_t i = 0;
        while (it.layer_types[i] == me.layer_types[i]) ++i;
        throw StateError(str_cat(source, ": layer ", i, " is ", it.layer_types[i],
                                 " in the state but ", me.layer_types[i], " in this model",
                                 misfit));
    }
    const std::vector<State::Slot> want = State::layout(config());
    std::vector<std::vector<float>> tensors;
    for (size_t i = 0; i < want.size(); ++i) {
        const std::string name =
            i < f.tensors.size() ? "'" + printable_ascii(f.tensors[i].name) + "'" : "None";
        if (i >= f.tensors.size() || f.tensors[i].name != want[i].name)
            throw StateError(str_cat(source, ": state tensor ", i, " is ", name,
                                     ", this model's is '", want[i].name, "'", misfit));
        std::vector<int64_t> shape{int64_t(want[i].layers.size())};
        shape.insert(shape.end(), want[i].shape.begin(), want[i].shape.end());
        if (f.tensors[i].shape != shape)
            throw StateError(str_cat(source, ": state tensor ", name, " has shape ",
                                     tuple_text(f.tensors[i].shape), ", this model's has shape ",
                                     tuple_text(shape), misfit));
        tensors.push_back(f.tensors[i].data);
    }
    if (f.tensors.size() > want.size())
        throw StateError(str_cat(source, ": unexpected state tensor '",
                                 printable_ascii(f.tensors[want.size()].name), "'", misfit));
    try {
        auto s = state_from_host(tensors, f.tokens, f.fed, f.logits);
        s->has_rng = f.has_rng;
        s->seed = f.seed;
        s->stream = f.stream;
        s->counter = f.counter;
        return s;
    } catch (const InvalidArgument& e) {
        throw StateError(str_cat(source, ": ", e.what()));
    }
}

std::shared_ptr<SequenceState> Generator::state_from_host(
    const std::vector<std::vector<float>>& tensors, std::vector<int32_t> tokens, int64_t fed,
    std::vector<float> logits) {
    auto s = std::make_shared<SequenceState>();
    s->backend = model_->backend_shared();
    s->state = std::make_unique<State>(config(), *s->backend, 1);
    s->tokens = std::move(tokens);
    s->fed = fed;
    s->logits = std::move(logits);
    check_state(*s, "state");
    s->state->row_from_host(0, tensors);  // checks the tensors' count and sizes
    return s;
}

std::shared_ptr<SequenceState> Generator::prefill(const std::vector<int32_t>& ids,
                                                  const SequenceState* from) {
    check_ids(ids, "prompt");
    if (from) check_state(*from, "state");
    MAMBART_CHECK_ARG(!ids.empty() || from, "prompt is empty: give at least one token");
    check_context((from ? int64_t(from->tokens.size()) : 0) + int64_t(ids.size()),
                  from ? "state + prompt" : "prompt");
    auto s = std::make_shared<SequenceState>();
    s->backend = model_->backend_shared();
    s->state = std::make_unique<State>(config(), *s->backend, 1);
    std::vector<int32_t> feed;
    if (from) {
        s->tokens = from->tokens;
        feed.assign(from->tokens.begin() + from->fed, from->tokens.end());
    }
    feed.insert(feed.end(), ids.begin(), ids.end());
    s->tokens.insert(s->tokens.end(), ids.begin(), ids.end());
    s->fed = int64_t(s->tokens.size());
    s->logits.resize(size_t(config().vocab_size));
    std::lock_guard<std::mutex> lock(compute_mu_);
    prefill_row(*s->state, 0, feed, s->logits.data(), nullptr, 0, from);
    return s;
}

namespace {
// log p(target) from one row of logits: log-softmax over the full vocabulary in double.
void logprob_of(const float* logits, int64_t V, int32_t target, double* lp, uint8_t* greedy) {
    int64_t best = 0;
    for (int64_t v = 1; v < V; ++v)
        if (logits[v] > logits[best]) best = v;
    const double mx = logits[best];
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(double(logits[v]) - mx);
    *lp = double(logits[target]) - mx - std::log(sum);
    *greedy = best == target ? 1 : 0;
}
}  // namespace

void Generator::score(const std::vector<int32_t>& ids, const SequenceState* from,
                      double* logprobs, uint8_t* greedy) {
    check_ids(ids, "token_ids");
    if (from) check_state(*from, "state");
    check_context((from ? int64_t(from->tokens.size()) : 0) + int64_t(ids.size()),
                  from ? "state + token_ids" : "token_ids");
    MAMBART_CHECK_ARG(from ? !ids.empty() : ids.size() >= 2,
                      from ? "token_ids must not be empty"
                           : "token_ids needs at least 2 tokens to score (the first has no "
                             "context; pass a state to score it)");
    const int64_t V = config().vocab_size;
    // seq = the state's pending tokens, then ids; position j's logits predict seq[j + 1].
    std::vector<int32_t> seq;
    if (from) seq.assign(from->tokens.begin() + from->fed, from->tokens.end());
    const int64_t p = int64_t(seq.size());
    seq.insert(seq.end(), ids.begin(), ids.end());
    const int64_t n = int64_t(seq.size());
    // Output k (0-based) is the logprob of seq[first + k]: first = p with a state, else 1.
    const int64_t first = from ? p : 1;
    if (from && p == 0) logprob_of(from->logits.data(), V, seq[0], logprobs, greedy);
    Model& m = *model_;
    Backend& be = m.backend();
    const int64_t chunk = Model::kLogitsRows;
    std::lock_guard<std::mutex> lock(compute_mu_);
    State st(config(), be, 1);
    m.reserve(std::min(chunk, n), Model::kLogitsRows);
    if (from)
        restore_row(st, 0, *from);
    else
        st.reset_row(0);
    std::vector<float> lg_host(size_t(std::min(chunk, n) * V));  // (chunk, V)
    for (int64_t off = 0; off < n - 1; off += chunk) {  // the last token predicts nothing
        const int64_t L = std::min(chunk, n - 1 - off);
        be.copy_to_device(m.ids_buffer(), seq.data() + off, size_t(L) * sizeof(int32_t));
        const float* lg = m.forward(st, 0, 1, L, m.ids_buffer(), LogitsMode::All);
        be.copy_to_host(lg_host.data(), lg, size_t(L * V) * sizeof(float));
        for (int64_t i = 0; i < L; ++i) {
            const int64_t t = off + i + 1;  // the token these logits predict
            if (t < first) continue;
            logprob_of(lg_host.data() + i * V, V, seq[size_t(t)], logprobs + (t - first),
                       greedy + (t - first));
        }
    }
}

std::unique_ptr<GenerationStream> Generator::start(
    const std::vector<std::vector<int32_t>>& prompts,
    const std::vector<GenerationOptions>& row_opts,
    const std::vector<std::shared_ptr<const SequenceState>>& starts, bool keep_states) {
    const size_t B = prompts.size();
    MAMBART_CHECK_ARG(B > 0, "prompts must not be empty");
    MAMBART_CHECK_ARG(row_opts.size() == B || row_opts.size() == 1, "got ", row_opts.size(),
                      " option sets for ", B, " prompts (give one, or one per prompt)");
    MAMBART_CHECK_ARG(starts.empty() || starts.size() == B, "got ", starts.size(),
                      " start states for ", B, " prompts");
    for (size_t i = 0; i < B; ++i) {
        const std::string row = B == 1 ? "" : str_cat(" (row ", i, ")");
        const GenerationOptions& o = row_opts[row_opts.size() == 1 ? 0 : i];
        MAMBART_CHECK_ARG(o.max_new_tokens >= 0, "max_new_tokens must be >= 0, got ",
                          o.max_new_tokens, row);
        MAMBART_CHECK_ARG(o.rng_stream >= -1, "rng_stream must be >= -1", row);
        validate(o.sampling);
        check_ids(o.stop_token_ids, "stop_token_ids" + row);
        const SequenceState* from = starts.empty() ? nullptr : starts[i].get();
        if (from) check_state(*from, B == 1 ? "state" : str_cat("states[", i, "]"));
        MAMBART_CHECK_ARG(!prompts[i].empty() || from, "prompt ", i,
                          " is empty: give at least one token");
        check_ids(prompts[i], B == 1 ? "prompt" : str_cat("prompts[", i, "]"));
        check_context((from ? int64_t(from->tokens.size()) : 0) + int64_t(prompts[i].size()) +
                          o.max_new_tokens,
                      str_cat(from ? "state + " : "", "prompt + max_new_tokens", row));
    }
    std::vector<GenerationOptions> opts(B, row_opts[0]);
    if (row_opts.size() == B) opts = row_opts;
    std::vector<std::shared_ptr<const SequenceState>> st = starts;
    st.resize(B);
    return std::unique_ptr<GenerationStream>(
        new GenerationStream(*this, prompts, std::move(opts), std::move(st), keep_states));
}

void Generator::logits(const std::vector<int32_t>& ids, float* out, int64_t chunk) {
    MAMBART_CHECK_ARG(!ids.empty(), "token_ids must not be empty");
    check_ids(ids, "token_ids");
    check_context(int64_t(ids.size()), "token_ids");
    std::lock_guard<std::mutex> lock(compute_mu_);
    State st(config(), model_->backend(), 1);
    prefill_row(st, 0, ids, nullptr, out, chunk);
}

std::unique_ptr<GenerationStream> Generator::start(
    const std::vector<std::vector<int32_t>>& prompts, const GenerationOptions& opt) {
    MAMBART_CHECK_ARG(!prompts.empty(), "prompts must not be empty");
    MAMBART_CHECK_ARG(opt.max_new_tokens >= 0, "max_new_tokens must be >= 0, got ",
                      opt.max_new_tokens);
    validate(opt.sampling);
    for (size_t i = 0; i < prompts.size(); ++i) {
        MAMBART_CHECK_ARG(!prompts[i].empty(), "prompt ", i, " is empty: give at least one token");
        check_ids(prompts[i], prompts.size() == 1 ? "prompt" : str_cat("prompts[", i, "]"));
        check_context(int64_t(prompts[i].size()) + opt.max_new_tokens,
                      str_cat("prompt + max_new_tokens",
                              prompts.size() == 1 ? "" : str_cat(" (row ", i, ")")));
    }
    check_ids(opt.stop_token_ids, "stop_token_ids");
    return std::unique_ptr<GenerationStream>(new GenerationStream(
        *this, prompts, std::vector<GenerationOptions>(prompts.size(), opt),
        std::vector<std::shared_ptr<const SequenceState>>(prompts.size()), false));
}

std::vector<GenerationResult> Generator::generate(
    const std::vector<std::vector<int32_t>>& prompts, const GenerationOptions& opt,
    const std::function<bool(int64_t, int32_t)>& callback) {
    auto stream = start(prompts, opt);
    std::vector<std::pair<int64_t, int32_t>> events;
    while (true) {
        events.clear();
        if (!stream->next(&events)) break;
        if (callback) {
            bool go_on = true;
            for (const auto& e : events) go_on = callback(e.first, e.second) && go_on;
            if (!go_on) break;
        }
    }
    return stream->results();
}

// ---- GenerationStream ------------------------------------------------------------------------

GenerationStream::GenerationStream(Generator& g, std::vector<std::vector<int32_t>> prompts,
                                   std::vector<GenerationOptions> row_opts,
                                   std::vector<std::shared_ptr<const SequenceState>> starts,
                                   bool keep_states)
    : gen_(g), opt_(row_opts.at(0)), prompts_(std::move(prompts)), B_(int64_t(prompts_.size())),
      active_(B_), row_opt_(std::move(row_opts)), starts_(std::move(starts)),
      keep_states_(keep_states) {
    const ModelConfig& c = g.config();
    // Issue 23: refuse a request whose memory cannot fit, before allocating any of it.
    GenerationRequest req;
    req.keep_states = keep_states_;
    for (int64_t r = 0; r < B_; ++r) {
        const SequenceState* from = starts_[size_t(r)].get();
        req.feed.push_back((from ? from->pending() : 0) + int64_t(prompts_[size_t(r)].size()));
        req.penalty_rows += row_opt_[size_t(r)].sampling.repetition_penalty != 1.0f;
    }
    check_generation_fits(*g.model_, req);
    state_ = std::make_unique<State>(c, g.model_->backend(), B_);
    samplers_.reserve(size_t(B_));
    for (int64_t r = 0; r < B_; ++r)  // only rows with a repetition penalty keep seen ids
        samplers_.emplace_back(c.vocab_size,
                               row_opt_[size_t(r)].sampling.repetition_penalty != 1.0f);
    logits_host_.resize(size_t(B_ * c.vocab_size));
    last_.assign(size_t(B_), 0);
    finished_.assign(size_t(B_), 0);
    results_.resize(size_t(B_));
    // Issue 7: per-row RNG streams, histories (a start state's tokens, then the prompt),
    // rows with max_new_tokens 0 finished from the start.
    stream_id_.resize(size_t(B_));
    history_.resize(size_t(B_));
    final_states_.resize(size_t(B_));
    prompt_states_.resize(size_t(B_));
    for (int64_t r = 0; r < B_; ++r) {
        const GenerationOptions& o = row_opt_[size_t(r)];
        stream_id_[size_t(r)] = o.rng_stream < 0 ? uint64_t(r) : uint64_t(o.rng_stream);
        const auto& o0 = row_opt_[0];
        if (o.sampling.temperature != o0.sampling.temperature ||
            o.sampling.top_k != o0.sampling.top_k || o.sampling.top_p != o0.sampling.top_p ||
            o.sampling.min_p != o0.sampling.min_p ||
            o.sampling.repetition_penalty != o0.sampling.repetition_penalty)
            uniform_sampling_ = false;
        auto& h = history_[size_t(r)];
        if (starts_[size_t(r)]) h = starts_[size_t(r)]->tokens;
        h.insert(h.end(), prompts_[size_t(r)].begin(), prompts_[size_t(r)].end());
        results_[size_t(r)].prompt_tokens = int64_t(h.size());
        if (o.max_new_tokens == 0) {
            results_[size_t(r)].finish_reason = FinishReason::Length;
            finished_[size_t(r)] = 1;
            --active_;
        }
    }
}

std::shared_ptr<SequenceState> GenerationStream::snapshot_row(int64_t r, bool with_logits) {
    const int64_t V = gen_.config().vocab_size;
    auto s = std::make_shared<SequenceState>();
    s->backend = gen_.model_->backend_shared();
    s->state = std::make_unique<State>(gen_.config(), *s->backend, 1);
    s->state->copy_row_from(*state_, r, 0);
    const GenerationOptions& o = row_opt_[size_t(r)];
    const auto& gen = results_[size_t(r)].token_ids;
    s->tokens = history_[size_t(r)];
    // After a sampled token the state has not run it yet (it is the next step's input).
    s->fed = int64_t(s->tokens.size()) - (gen.empty() ? 0 : 1);
    if (with_logits) {
        const std::vector<float>& lh = last_logits();
        s->logits.assign(lh.begin() + r * V, lh.begin() + (r + 1) * V);
    }
    s->has_rng = true;
    s->seed = o.seed;
    s->stream = stream_id_[size_t(r)];
    s->counter = o.rng_counter + uint64_t(gen.size());
    return s;
}

std::shared_ptr<SequenceState> GenerationStream::prompt_state(int64_t row) const {
    MAMBART_CHECK_ARG(row >= 0 && row < B_, "row ", row, " out of range [0, ", B_, ")");
    return prompt_states_[size_t(row)];
}

std::shared_ptr<SequenceState> GenerationStream::row_state(int64_t row) {
    MAMBART_CHECK_ARG(row >= 0 && row < B_, "row ", row, " out of range [0, ", B_, ")");
    MAMBART_CHECK_ARG(keep_states_, "this generation was started without keep_states");
    if (final_states_[size_t(row)]) return final_states_[size_t(row)];
    std::lock_guard<std::mutex> lock(gen_.compute_mu_);
    if (!prefilled_) prefill();  // e.g. every row had max_new_tokens 0
    if (prompt_states_[size_t(row)] && results_[size_t(row)].token_ids.empty())
        return prompt_states_[size_t(row)];
    return snapshot_row(row, false);  // a row still running (the caller stopped early)
}

GenerationStream::~GenerationStream() {
    if (seen_dev_) gen_.model_->backend().dealloc(seen_dev_);
}

const std::vector<float>& GenerationStream::last_logits() const {
    if (logits_stale_) {
        gen_.model_->backend().copy_to_host(logits_host_.data(), logits_dev_,
                                            logits_host_.size() * sizeof(float));
        logits_stale_ = false;
    }
    return logits_host_;
}

bool GenerationStream::use_device_decode() {
    if (device_decode_ < 0) {
        const bool on = runtime_options().device_sampling;
        device_decode_ = on && uniform_sampling_ && gen_.model_->backend().supports_graphs();
    }
    return device_decode_ == 1;
}

void GenerationStream::decode_on_device(std::vector<std::pair<int64_t, int32_t>>* out) {
    const auto t0 = Clock::now();
    Model& m = *gen_.model_;
    Backend& be = m.backend();
    const int64_t V = gen_.config().vocab_size;
    const SamplingOptions& so = row_opt_[0].sampling;  // uniform across rows here
    if (so.repetition_penalty != 1.0f && !seen_dev_) {  // once: the ids each sampler has seen
        seen_dev_ = static_cast<uint8_t*>(be.alloc(size_t(B_ * V), "the repetition-penalty mask"));
        std::vector<uint8_t> seen;  // (<= Model::kLogitsRows rows, V): staged a block at a time
        for (int64_t r0 = 0; r0 < B_; r0 += Model::kLogitsRows) {
            const int64_t k = std::min(Model::kLogitsRows, B_ - r0);
            seen.assign(size_t(k * V), 0);
            for (int64_t r = r0; r < r0 + k; ++r)
                for (int32_t id : samplers_[size_t(r)].seen_ids())
                    seen[size_t((r - r0) * V + id)] = 1;
            be.copy_to_device(seen_dev_ + r0 * V, seen.data(), seen.size());
        }
    }
    rng_host_.resize(size_t(B_) * 3);
    tokens_host_.resize(size_t(B_));
    for (int64_t r = 0; r < B_; ++r) {  // the same draw as the host sampler's
        const GenerationOptions& o = row_opt_[size_t(r)];
        rng_host_[size_t(3 * r)] = o.seed;
        rng_host_[size_t(3 * r + 1)] = stream_id_[size_t(r)];
        rng_host_[size_t(3 * r + 2)] = o.rng_counter + uint64_t(results_[size_t(r)].token_ids.size());
    }
    const DeviceSampleParams sp = device_sample_params(so, seen_dev_);
    logits_dev_ = m.decode_step(*state_, B_, sp, rng_host_.data(), last_.data(),
                                tokens_host_.data());
    logits_stale_ = true;
    const double ms = ms_since(t0);
    for (int64_t r = 0; r < B_; ++r) {
        if (finished_[size_t(r)]) continue;
        GenerationResult& res = results_[size_t(r)];
        const int32_t tok = tokens_host_[size_t(r)];
        if (tok < 0)
            throw Error(str_cat("the model produced a non-finite logit in row ", r, " after ",
                                res.token_ids.size(), " generated tokens"));
        res.decode_ms += ms;
        emit(r, tok, out);
    }
}

void GenerationStream::finish_row(int64_t row, FinishReason reason) {
    if (row < 0 || row >= B_ || finished_[size_t(row)]) return;
    // Issue 7: later decode steps still run this row (the batch decodes together), so its state
    // is taken now. Not yet prefilled: row_state() prefills on demand.
    if (keep_states_ && prefilled_)
        final_states_[size_t(row)] = results_[size_t(row)].token_ids.empty()
                                         ? prompt_states_[size_t(row)]
                                         : snapshot_row(row, false);
    finished_[size_t(row)] = 1;
    results_[size_t(row)].finish_reason = reason;
    --active_;
}

void GenerationStream::emit(int64_t row, int32_t token,
                            std::vector<std::pair<int64_t, int32_t>>* out) {
    GenerationResult& res = results_[size_t(row)];
    const GenerationOptions& o = row_opt_[size_t(row)];  // issue 7: per-row options
    res.token_ids.push_back(token);
    history_[size_t(row)].push_back(token);
    samplers_[size_t(row)].observe(token);
    last_[size_t(row)] = token;
    out->emplace_back(row, token);
    const ModelConfig& c = gen_.config();
    if (!o.ignore_eos && c.eos_token_id >= 0 && token == c.eos_token_id)
        finish_row(row, FinishReason::Eos);
    else if (std::find(o.stop_token_ids.begin(), o.stop_token_ids.end(), token) !=
             o.stop_token_ids.end())
        finish_row(row, FinishReason::StopToken);
    else if (int64_t(res.token_ids.size()) >= o.max_new_tokens)
        finish_row(row, FinishReason::Length);
}

// Variable-length prefill (issue 7): the B rows run together, without padding. A row feeds its
// start state's pending tokens, then its prompt. The rows with something to feed are sorted by
// feed length, longest first, into rows [0, n) of a work state (the stream's own state when the
// sorted order is already rows 0..n-1, else a temporary n-row state). The prefill then runs in
// stages between the distinct lengths: at position pos the rows that still have tokens are a
// prefix [0, n_k) of the sorted order, and they run together as one (n_k x seg) forward from
// their states, seg <= the distance to the next row's end and n_k * seg <= max(n_k,
// Model::prefill_chunk()) (activation memory stays bounded; one row alone runs in the same
// chunks as a single prefill). A row whose feed ends with a call takes its next-token logits
// from that call's LogitsMode::Last output. Rows never mix in any op, so each row's logits and
// state equal its single run up to float rounding (its segment boundaries and the GEMM shapes
// differ from a single run's). Rows with nothing to feed (a start state without pending tokens
// and an empty prompt) only restore their state and take its logits.
void GenerationStream::prefill() {
    const auto t0 = Clock::now();
    Model& m = *gen_.model_;
    Backend& be = m.backend();
    const int64_t V = gen_.config().vocab_size;
    std::vector<std::vector<int32_t>> feed(static_cast<size_t>(B_));  // (B) tokens per row
    std::vector<int64_t> order;                           // (n) rows to run, longest feed first
    for (int64_t r = 0; r < B_; ++r) {
        const SequenceState* from = starts_[size_t(r)].get();
        auto& f = feed[size_t(r)];
        if (from) f.assign(from->tokens.begin() + from->fed, from->tokens.end());
        f.insert(f.end(), prompts_[size_t(r)].begin(), prompts_[size_t(r)].end());
        if (f.empty())  // nothing to run: the start state and its own next-token logits
            gen_.prefill_row(*state_, r, f, logits_host_.data() + r * V, nullptr, 0, from);
        else
            order.push_back(r);
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return feed[size_t(a)].size() > feed[size_t(b)].size();
    });
    const int64_t n = int64_t(order.size());
    auto len = [&](int64_t i) { return int64_t(feed[size_t(order[size_t(i)])].size()); };
    std::vector<int64_t> lens(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) lens[size_t(i)] = len(i);
    const std::vector<PrefillCall> plan = plan_prefill(lens, gen_.model_->prefill_chunk());
    int64_t max_tokens = 0;
    for (const PrefillCall& c : plan) max_tokens = std::max(max_tokens, c.rows * c.seg);
    // One reservation for the prefill's largest call and the decode steps after it (B rows).
    m.reserve(std::max(max_tokens, B_), std::max(n, B_));
    if (n > 0) {
        bool in_place = true;  // the sorted rows are rows 0..n-1 of the stream's state
        for (int64_t i = 0; i < n; ++i) in_place = in_place && order[size_t(i)] == i;
        std::unique_ptr<State> tmp;
        if (!in_place) tmp = std::make_unique<State>(gen_.config(), be, n);
        State& work = in_place ? *state_ : *tmp;
        for (int64_t i = 0; i < n; ++i) {
            const SequenceState* from = starts_[size_t(order[size_t(i)])].get();
            if (from)
                gen_.restore_row(work, i, *from);
            else
                work.reset_row(i);
        }
        std::vector<int32_t> ids;    // (rows, seg) the call's tokens, row-major
        std::vector<float> lg_host;  // (<= Model::kLogitsRows rows ending, V)
        for (const PrefillCall& c : plan) {
            ids.resize(size_t(c.rows * c.seg));
            for (int64_t i = 0; i < c.rows; ++i) {
                const auto& f = feed[size_t(order[size_t(i)])];
                std::copy(f.begin() + c.pos, f.begin() + c.pos + c.seg, ids.begin() + i * c.seg);
            }
            be.copy_to_device(m.ids_buffer(), ids.data(), ids.size() * sizeof(int32_t));
            const int64_t end = c.pos + c.seg;
            // The rows ending here are a suffix [first, rows) of the call's rows.
            int64_t first = c.rows;
            while (first > 0 && len(first - 1) == end) --first;
            const LogitsMode mode = first < c.rows ? LogitsMode::Last : LogitsMode::None;
            const float* lg = m.forward(work, 0, c.rows, c.seg, m.ids_buffer(), mode);
            ++prefill_forward_calls_;
            if (mode == LogitsMode::None) continue;
            // Staged Model::kLogitsRows rows at a time: the staging does not grow with the batch.
            for (int64_t i0 = first; i0 < c.rows; i0 += Model::kLogitsRows) {
                const int64_t k = std::min(Model::kLogitsRows, c.rows - i0);
                lg_host.resize(size_t(k * V));
                be.copy_to_host(lg_host.data(), lg + i0 * V, lg_host.size() * sizeof(float));
                for (int64_t i = i0; i < i0 + k; ++i)
                    std::copy(lg_host.begin() + (i - i0) * V, lg_host.begin() + (i - i0 + 1) * V,
                              logits_host_.begin() + order[size_t(i)] * V);
            }
        }
        if (!in_place)
            for (int64_t i = 0; i < n; ++i) state_->copy_row_from(work, i, order[size_t(i)]);
    }
    const double ms = ms_since(t0);
    for (int64_t r = 0; r < B_; ++r) {
        results_[size_t(r)].prefill_ms = ms;
        results_[size_t(r)].prefill_tokens = int64_t(feed[size_t(r)].size());
        for (int32_t id : history_[size_t(r)]) samplers_[size_t(r)].observe(id);
        if (keep_states_) prompt_states_[size_t(r)] = snapshot_row(r, true);
    }
    prefilled_ = true;
    if (keep_states_)  // rows that finished before their first token (max_new_tokens 0)
        for (int64_t r = 0; r < B_; ++r)
            if (finished_[size_t(r)]) final_states_[size_t(r)] = prompt_states_[size_t(r)];
}

bool GenerationStream::next(std::vector<std::pair<int64_t, int32_t>>* out) {
    if (active_ == 0) return false;
    std::lock_guard<std::mutex> lock(gen_.compute_mu_);
    const int64_t V = gen_.config().vocab_size;
    const auto t0 = Clock::now();
    const bool decode_step = prefilled_;
    if (!prefilled_) {
        prefill();
    } else if (use_device_decode()) {
        decode_on_device(out);
        ++step_;
        return true;
    } else {
        Model& m = *gen_.model_;
        Backend& be = m.backend();
        be.copy_to_device(m.ids_buffer(), last_.data(), size_t(B_) * sizeof(int32_t));
        const float* lg = m.forward(*state_, 0, B_, 1, m.ids_buffer(), LogitsMode::Last);
        be.copy_to_host(logits_host_.data(), lg, size_t(B_ * V) * sizeof(float));
    }
    // Sample one token for every active row. Row r's k-th token uses counter k.
    // NaN or Inf logits would make the sampler pick an arbitrary token: an error instead of a
    // silent wrong answer. The sampler works on a copy so last_logits() stays the raw logits.
    for (int64_t r = 0; r < B_; ++r) {
        if (finished_[size_t(r)]) continue;
        GenerationResult& res = results_[size_t(r)];
        const float* row = logits_host_.data() + r * V;
        for (int64_t v = 0; v < V; ++v)
            if (!std::isfinite(row[v]))
                throw Error(str_cat("the model produced a non-finite logit (", row[v],
                                    ") for token id ", v, " in row ", r, " after ",
                                    res.token_ids.size(), " generated tokens"));
        scratch_.assign(row, row + V);
        const GenerationOptions& o = row_opt_[size_t(r)];  // issue 7: per-row RNG position
        const int32_t tok = samplers_[size_t(r)].sample(
            scratch_.data(), o.sampling, o.seed, stream_id_[size_t(r)],
            o.rng_counter + uint64_t(res.token_ids.size()));
        if (decode_step) res.decode_ms += ms_since(t0);
        emit(r, tok, out);
    }
    ++step_;
    return true;
}

}  // namespace mambart
