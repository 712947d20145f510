#include "generator.h"

#include <algorithm>
#include <cmath>

#include "error.h"

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
        case FinishReason::None: break;
    }
    return "none";
}

// ---- Generator -------------------------------------------------------------------------------

Generator::Generator(const std::string& model_dir, const std::string& device, const DType* dtype) {
    std::shared_ptr<Backend> backend = make_backend(device);
    model_ = std::make_unique<Model>(model_dir, std::move(backend), dtype);
}

void Generator::check_ids(const std::vector<int32_t>& ids, const std::string& what) const {
    const int64_t V = config().vocab_size;
    for (size_t i = 0; i < ids.size(); ++i)
        if (ids[i] < 0 || ids[i] >= V)
            throw InvalidArgument(str_cat(what, "[", i, "] = ", ids[i],
                                          " is outside the vocabulary [0, ", V, ")"));
}

void Generator::prefill_row(State& st, int64_t row, const std::vector<int32_t>& ids,
                            float* last_logits, float* all_logits, int64_t chunk) {
    Model& m = *model_;
    Backend& be = m.backend();
    const int64_t V = config().vocab_size;
    const int64_t n = int64_t(ids.size());
    // All-logits prefill runs in chunks the logits workspace holds; otherwise in big chunks.
    const int64_t max_chunk = all_logits ? Model::kLogitsRows : Model::kPrefillChunk;
    chunk = chunk > 0 ? std::min(chunk, max_chunk) : max_chunk;
    m.reserve(std::min(chunk, n), Model::kLogitsRows);
    st.reset_row(row);
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

void Generator::logits(const std::vector<int32_t>& ids, float* out, int64_t chunk) {
    MAMBART_CHECK_ARG(!ids.empty(), "token_ids must not be empty");
    check_ids(ids, "token_ids");
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
    }
    check_ids(opt.stop_token_ids, "stop_token_ids");
    return std::unique_ptr<GenerationStream>(new GenerationStream(*this, prompts, opt));
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
                                   const GenerationOptions& opt)
    : gen_(g), opt_(opt), prompts_(std::move(prompts)), B_(int64_t(prompts_.size())),
      active_(B_) {
    const ModelConfig& c = g.config();
    state_ = std::make_unique<State>(c, g.model_->backend(), B_);
    samplers_.reserve(size_t(B_));
    for (int64_t r = 0; r < B_; ++r) samplers_.emplace_back(c.vocab_size);
    logits_host_.resize(size_t(B_ * c.vocab_size));
    last_.assign(size_t(B_), 0);
    finished_.assign(size_t(B_), 0);
    results_.resize(size_t(B_));
    for (int64_t r = 0; r < B_; ++r) results_[size_t(r)].prompt_tokens = int64_t(prompts_[r].size());
    if (opt_.max_new_tokens == 0) {
        for (auto& res : results_) res.finish_reason = FinishReason::Length;
        finished_.assign(size_t(B_), 1);
        active_ = 0;
    }
}

GenerationStream::~GenerationStream() = default;

void GenerationStream::finish_row(int64_t row, FinishReason reason) {
    if (row < 0 || row >= B_ || finished_[size_t(row)]) return;
    finished_[size_t(row)] = 1;
    results_[size_t(row)].finish_reason = reason;
    --active_;
}

void GenerationStream::emit(int64_t row, int32_t token,
                            std::vector<std::pair<int64_t, int32_t>>* out) {
    GenerationResult& res = results_[size_t(row)];
    res.token_ids.push_back(token);
    samplers_[size_t(row)].observe(token);
    last_[size_t(row)] = token;
    out->emplace_back(row, token);
    const ModelConfig& c = gen_.config();
    if (!opt_.ignore_eos && c.eos_token_id >= 0 && token == c.eos_token_id)
        finish_row(row, FinishReason::Eos);
    else if (std::find(opt_.stop_token_ids.begin(), opt_.stop_token_ids.end(), token) !=
             opt_.stop_token_ids.end())
        finish_row(row, FinishReason::StopToken);
    else if (int64_t(res.token_ids.size()) >= opt_.max_new_tokens)
        finish_row(row, FinishReason::Length);
}

void GenerationStream::prefill() {
    const int64_t V = gen_.config().vocab_size;
    for (int64_t r = 0; r < B_; ++r) {
        const auto t0 = Clock::now();
        gen_.prefill_row(*state_, r, prompts_[size_t(r)], logits_host_.data() + r * V, nullptr);
        results_[size_t(r)].prefill_ms = ms_since(t0);
        for (int32_t id : prompts_[size_t(r)]) samplers_[size_t(r)].observe(id);
    }
    // Decode steps run all B rows together: reserve their workspace now, not per token.
    gen_.model_->reserve(B_, B_);
    prefilled_ = true;
}

bool GenerationStream::next(std::vector<std::pair<int64_t, int32_t>>* out) {
    if (active_ == 0) return false;
    std::lock_guard<std::mutex> lock(gen_.compute_mu_);
    const int64_t V = gen_.config().vocab_size;
    const auto t0 = Clock::now();
    const bool decode_step = prefilled_;
    if (!prefilled_) {
        prefill();
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
        const int32_t tok = samplers_[size_t(r)].sample(scratch_.data(),
                                                        opt_.sampling, opt_.seed, uint64_t(r),
                                                        uint64_t(res.token_ids.size()));
        if (decode_step) res.decode_ms += ms_since(t0);
        emit(r, tok, out);
    }
    ++step_;
    return true;
}

}  // namespace mambart
