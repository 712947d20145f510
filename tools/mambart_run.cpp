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

#include "error.h"
#include "generator.h"
#include "run_args.h"

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
    try {
        mambart::GenerationOptions opt;
        if (args.max_new_tokens) opt.max_new_tokens = *args.max_new_tokens;
        if (args.temperature) opt.sampling.temperature = *args.temperature;
        if (args.top_k) opt.sampling.top_k = *args.top_k;
        if (args.top_p) opt.sampling.top_p = *args.top_p;
        if (args.min_p) opt.sampling.min_p = *args.min_p;
        if (args.repetition_penalty) opt.sampling.repetition_penalty = *args.repetition_penalty;
        if (args.seed) opt.seed = *args.seed;
        opt.ignore_eos = args.ignore_eos;
        mambart::Generator gen(args.model_dir, args.device, nullptr);
        const auto results = gen.generate({args.tokens}, opt);
        const auto& toks = results.at(0).token_ids;
        for (size_t i = 0; i < toks.size(); ++i) std::printf(i ? " %d" : "%d", toks[i]);
        std::printf("\n");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mambart-run: error: %s\n", e.what());
        return 1;
    }
}
