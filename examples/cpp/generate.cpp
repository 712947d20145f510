// The mambart C API from C++: RAII owners for the handles, several concurrent requests on one
// model (they share the engine's decode steps), results collected as each finishes.
//   generate_cpp MODEL_DIR [N_REQUESTS] [MAX_NEW_TOKENS]
#include <mambart.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {
struct ModelFree { void operator()(mambart_model* m) const { mambart_model_free(m); } };
struct RequestFree { void operator()(mambart_request* r) const { mambart_request_free(r); } };
using Model = std::unique_ptr<mambart_model, ModelFree>;
using Request = std::unique_ptr<mambart_request, RequestFree>;

void check(mambart_status st, const char* what) {
    if (st != MAMBART_OK)
        throw std::runtime_error(std::string(what) + ": " + mambart_status_name(st) + ": " +
                                 mambart_last_error());
}
}  // namespace

int main(int argc, char** argv) try {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL_DIR [N_REQUESTS] [MAX_NEW_TOKENS]\n", argv[0]);
        return 2;
    }
    const int n = argc > 2 ? std::atoi(argv[2]) : 4;
    mambart_model* raw = nullptr;
    check(mambart_model_load(argv[1], nullptr, &raw), "load");
    Model model(raw);
    std::vector<Request> reqs;
    for (int i = 0; i < n; ++i) {
        mambart_request_options opt;
        mambart_request_options_init(&opt);
        opt.max_new_tokens = argc > 3 ? std::atoi(argv[3]) : 8;
        opt.ignore_eos = 1;
        const std::vector<int32_t> prompt = {1 + i, 2, 3 + i};
        mambart_request* r = nullptr;
        check(mambart_submit(model.get(), prompt.data(), prompt.size(), nullptr, &opt, &r), "submit");
        reqs.emplace_back(r);
    }
    for (int i = 0; i < n; ++i) {
        int finished = 0;
        check(mambart_request_wait(reqs[i].get(), -1.0, &finished), "wait");
        mambart_result res;
        check(mambart_request_result(reqs[i].get(), &res), "result");
        std::vector<int32_t> toks(res.n_tokens);
        size_t got = 0;
        check(mambart_request_tokens(reqs[i].get(), toks.data(), toks.size(), &got), "tokens");
        std::printf("request %d:", i);
        for (int32_t t : toks) std::printf(" %d", t);
        std::printf("\n");
    }
    mambart_stats st;
    check(mambart_model_stats(model.get(), &st), "stats");
    std::printf("steps=%lld rows_decoded=%lld\n", (long long)st.steps, (long long)st.rows_decoded);
    return 0;
} catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
}
