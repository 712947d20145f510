// mambart-run: the C++ library without Python. Loads a mambart model directory and generates
// from token ids.
//
//   mambart-run MODEL_DIR --tokens 1,2,3 [--max-new-tokens N] [--temperature T] [--top-k K]
//               [--top-p P] [--min-p P] [--repetition-penalty R] [--seed S] [--device cpu]
//               [--ignore-eos]
//
// Prints the generated token ids, space separated, on one line; errors go to stderr: exit 2 for
// a bad command line (tools/run_args.h: strict, naming the flag and value), 1 otherwise.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "mambart.h"  // the C API (issue 14): mambart-run is one of its clients
#include "run_args.h"

namespace {
int fail(const char* what) {
    std::fprintf(stderr, "mambart-run: error: %s%s\n", what, mambart_last_error());
    return 1;
}
}  // namespace

int main(int argc, char** argv) {
    namespace ra = mambart::run_args;
    ra::RunArgs args;
    try {
        args = ra::parse(std::vector<std::string>(argv + 1, argv + argc));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mambart-run: error: %s\n%s\n", e.what(), ra::kUsage);
        return 2;
    }
    if (args.help) {
        std::printf("%s\n", ra::kUsage);
        return 0;
    }
    mambart_load_options lo;
    mambart_load_options_init(&lo);
    lo.device = args.device.c_str();
    mambart_model* model = nullptr;
    if (mambart_model_load(args.model_dir.c_str(), &lo, &model) != MAMBART_OK) return fail("");
    mambart_request_options opt;
    mambart_request_options_init(&opt);
    if (args.max_new_tokens) opt.max_new_tokens = *args.max_new_tokens;
    if (args.temperature) opt.temperature = float(*args.temperature);
    if (args.top_k) opt.top_k = *args.top_k;
    if (args.top_p) opt.top_p = float(*args.top_p);
    if (args.min_p) opt.min_p = float(*args.min_p);
    if (args.repetition_penalty) opt.repetition_penalty = float(*args.repetition_penalty);
    if (args.seed) opt.seed = *args.seed;
    opt.ignore_eos = args.ignore_eos ? 1 : 0;
    mambart_request* req = nullptr;
    int finished = 0;
    mambart_result res;
    int rc = 0;
    if (mambart_submit(model, args.tokens.data(), args.tokens.size(), nullptr, &opt, &req) !=
            MAMBART_OK ||
        mambart_request_wait(req, -1.0, &finished) != MAMBART_OK ||
        mambart_request_result(req, &res) != MAMBART_OK) {
        rc = fail("");
    } else {
        std::vector<int32_t> toks(res.n_tokens);
        size_t n = 0;
        mambart_request_tokens(req, toks.data(), toks.size(), &n);
        for (size_t i = 0; i < n; ++i) std::printf(i ? " %d" : "%d", toks[i]);
        std::printf("\n");
    }
    mambart_request_free(req);
    mambart_model_free(model);
    return rc;
}
