// mambart-run: the C++ library without Python. Loads a mambart model directory and generates
// from token ids.
//
//   mambart-run MODEL_DIR --tokens 1,2,3 [--max-new-tokens N] [--temperature T] [--top-k K]
//               [--top-p P] [--min-p P] [--repetition-penalty R] [--seed S] [--device cpu]
//               [--ignore-eos]
//
// Prints the generated token ids, space separated, on one line; errors go to stderr, exit 1.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "error.h"
#include "generator.h"

namespace {

std::vector<int32_t> parse_ids(const std::string& s) {
    std::vector<int32_t> ids;
    size_t pos = 0;
    while (pos < s.size()) {
        size_t end = s.find(',', pos);
        if (end == std::string::npos) end = s.size();
        const std::string tok = s.substr(pos, end - pos);
        if (!tok.empty()) {
            size_t used = 0;
            const long v = std::stol(tok, &used);
            if (used != tok.size()) throw mambart::InvalidArgument("--tokens: bad id '" + tok + "'");
            ids.push_back(int32_t(v));
        }
        pos = end + 1;
    }
    return ids;
}

int usage() {
    std::fprintf(stderr,
                 "usage: mambart-run MODEL_DIR --tokens 1,2,3 [--max-new-tokens N] "
                 "[--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] "
                 "[--seed S] [--device cpu] [--ignore-eos]\n");
    return 1;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    try {
        std::string dir = argv[1], device = "cpu";
        std::vector<int32_t> ids;
        mambart::GenerationOptions opt;
        for (int i = 2; i < argc; ++i) {
            const std::string a = argv[i];
            if (a == "--ignore-eos") {
                opt.ignore_eos = true;
                continue;
            }
            if (i + 1 >= argc) return usage();
            const std::string v = argv[++i];
            if (a == "--tokens") ids = parse_ids(v);
            else if (a == "--max-new-tokens") opt.max_new_tokens = std::stoll(v);
            else if (a == "--temperature") opt.sampling.temperature = std::stof(v);
            else if (a == "--top-k") opt.sampling.top_k = std::stoll(v);
            else if (a == "--top-p") opt.sampling.top_p = std::stof(v);
            else if (a == "--min-p") opt.sampling.min_p = std::stof(v);
            else if (a == "--repetition-penalty") opt.sampling.repetition_penalty = std::stof(v);
            else if (a == "--seed") opt.seed = std::stoull(v);
            else if (a == "--device") device = v;
            else return usage();
        }
        if (ids.empty()) return usage();
        mambart::Generator gen(dir, device, nullptr);
        const auto results = gen.generate({ids}, opt);
        const auto& toks = results.at(0).token_ids;
        for (size_t i = 0; i < toks.size(); ++i) std::printf(i ? " %d" : "%d", toks[i]);
        std::printf("\n");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mambart-run: error: %s\n", e.what());
        return 1;
    }
}
