/* Greedy generation through the mambart C API: load a model directory, submit token ids, print
 * the new tokens as they arrive (ids, and their text where the model has a tokenizer.json).
 *   generate MODEL_DIR [ID,ID,...] [MAX_NEW_TOKENS]                                          */
#include <mambart.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [ID,ID,...] [MAX_NEW_TOKENS]\n", argv[0]);
        return 2;
    }
    int32_t prompt[256];
    size_t n = 0;
    const char* ids = argc > 2 ? argv[2] : "1,2,3";
    for (const char* p = ids; *p && n < 256;) {
        char* end;
        long v = strtol(p, &end, 10);
        if (end == p) { fprintf(stderr, "bad token id list: %s\n", ids); return 2; }
        prompt[n++] = (int32_t)v;
        p = *end == ',' ? end + 1 : end;
    }
    mambart_model* model = NULL;
    mambart_status st = mambart_model_load(argv[1], NULL, &model);
    if (st != MAMBART_OK) {
        fprintf(stderr, "load failed (%s): %s\n", mambart_status_name(st), mambart_last_error());
        return 1;
    }
    mambart_request_options opt;
    mambart_request_options_init(&opt);
    opt.max_new_tokens = argc > 3 ? atoi(argv[3]) : 16;
    opt.ignore_eos = 1;
    mambart_request* req = NULL;
    st = mambart_submit(model, prompt, n, NULL, &opt, &req);
    if (st != MAMBART_OK) {
        fprintf(stderr, "submit failed (%s): %s\n", mambart_status_name(st), mambart_last_error());
        mambart_model_free(model);
        return 1;
    }
    int finished = 0;
    printf("tokens:");
    while (!finished) {
        int32_t buf[64];
        size_t got = 0;
        if (mambart_request_read(req, buf, 64, &got, -1.0, &finished) != MAMBART_OK) break;
        for (size_t i = 0; i < got; ++i) printf(" %d", buf[i]);
        fflush(stdout);
    }
    printf("\n");
    mambart_result res;
    st = mambart_request_result(req, &res);
    printf("finish=%d prompt_tokens=%lld prefill_ms=%.2f decode_ms=%.2f\n", (int)res.finish_reason,
           (long long)res.prompt_tokens, res.prefill_ms, res.decode_ms);
    mambart_request_free(req);
    mambart_model_free(model);
    return st == MAMBART_OK ? 0 : 1;
}
