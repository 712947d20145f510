/* Drives the C API from C (tests/test_c_api.py compiles and runs it): bad handles, bad options,
 * a path that is not a model, invalid token ids, a state from another model, a full queue; then
 * greedy generation, continuing from a kept state, cancel and stop strings. Prints one line per
 * check ("ok NAME" or "FAIL NAME: ...") and the generated tokens for the Python side to compare.
 *   test_c_api MODEL_DIR OTHER_MODEL_DIR NOT_A_MODEL_DIR                                      */
#include <mambart.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

static void expect(const char* name, mambart_status got, mambart_status want, const char* needle) {
    const char* msg = mambart_last_error();
    if (got != want) {
        printf("FAIL %s: got %s, want %s (%s)\n", name, mambart_status_name(got),
               mambart_status_name(want), msg);
        ++failures;
    } else if (needle && !strstr(msg, needle)) {
        printf("FAIL %s: message \"%s\" lacks \"%s\"\n", name, msg, needle);
        ++failures;
    } else {
        printf("ok %s\n", name);
    }
}

static void print_tokens(const char* label, mambart_request* r) {
    int32_t buf[256];
    size_t n = 0;
    mambart_request_tokens(r, buf, 256, &n);
    printf("%s", label);
    for (size_t i = 0; i < n; ++i) printf(" %d", buf[i]);
    printf("\n");
}

int main(int argc, char** argv) {
    if (argc < 4) return 2;
    const int32_t prompt[] = {5, 17, 33, 2, 60, 9, 41};
    const size_t np = sizeof(prompt) / sizeof(prompt[0]);
    mambart_model* m = NULL;
    mambart_request* r = NULL;
    mambart_state* s = NULL;
    mambart_state* s2 = NULL;
    mambart_request_options opt;
    mambart_load_options lo;
    int finished = 0;
    size_t n = 0;
    int32_t buf[8];

    /* Handles: NULL, freed, foreign. */
    expect("null model submit", mambart_submit(NULL, prompt, np, NULL, NULL, &r), MAMBART_ERR_HANDLE,
           "model is NULL, freed");
    expect("null request read", mambart_request_read(NULL, buf, 8, &n, 0, &finished),
           MAMBART_ERR_HANDLE, "request");
    expect("foreign request", mambart_request_cancel((mambart_request*)prompt), MAMBART_ERR_HANDLE,
           NULL);
    mambart_model_free(NULL);
    mambart_request_free(NULL);
    mambart_state_free((mambart_state*)buf); /* foreign: ignored, not freed */
    /* Loading. */
    expect("load not a model", mambart_model_load(argv[3], NULL, &m), MAMBART_ERR_MODEL_LOAD,
           argv[3]);
    expect("load null path", mambart_model_load(NULL, NULL, &m), MAMBART_ERR_INVALID_ARGUMENT,
           "model_dir");
    mambart_load_options_init(&lo);
    lo.dtype = "int3";
    expect("load bad dtype", mambart_model_load(argv[1], &lo, &m), MAMBART_ERR_INVALID_ARGUMENT,
           "int3");
    mambart_load_options_init(&lo);
    lo.device = "tpu";
    expect("load bad device", mambart_model_load(argv[1], &lo, &m), MAMBART_ERR_INVALID_ARGUMENT,
           "tpu");
    mambart_load_options_init(&lo);
    lo.struct_size = 3;
    expect("load bad struct_size", mambart_model_load(argv[1], &lo, &m),
           MAMBART_ERR_INVALID_ARGUMENT, "struct_size");
    mambart_load_options_init(&lo);
    lo.max_queue = 1;
    expect("load", mambart_model_load(argv[1], &lo, &m), MAMBART_OK, NULL);
    if (!m) return 1;
    printf("vocab %lld\n", (long long)mambart_model_vocab_size(m));

    /* Bad requests. */
    mambart_request_options_init(&opt);
    opt.temperature = -1.0f;
    expect("negative temperature", mambart_submit(m, prompt, np, NULL, &opt, &r),
           MAMBART_ERR_INVALID_ARGUMENT, "temperature");
    expect("model error kept", strstr(mambart_model_error(m), "temperature") ? MAMBART_OK
                                                                              : MAMBART_ERR_RUNTIME,
           MAMBART_OK, NULL);
    mambart_request_options_init(&opt);
    opt.top_p = 0.0f;
    expect("top_p zero", mambart_submit(m, prompt, np, NULL, &opt, &r),
           MAMBART_ERR_INVALID_ARGUMENT, "top_p");
    mambart_request_options_init(&opt);
    opt.max_new_tokens = -5;
    expect("negative max_new_tokens", mambart_submit(m, prompt, np, NULL, &opt, &r),
           MAMBART_ERR_INVALID_ARGUMENT, "max_new_tokens");
    mambart_request_options_init(&opt);
    {
        const int32_t bad[] = {1, 2, 1000000};
        expect("token id out of range", mambart_submit(m, bad, 3, NULL, &opt, &r),
               MAMBART_ERR_INVALID_ARGUMENT, "outside the vocabulary");
        const int32_t neg[] = {-1};
        expect("negative token id", mambart_submit(m, neg, 1, NULL, &opt, &r),
               MAMBART_ERR_INVALID_ARGUMENT, "outside the vocabulary");
    }
    expect("empty prompt", mambart_submit(m, prompt, 0, NULL, &opt, &r),
           MAMBART_ERR_INVALID_ARGUMENT, "prompt is empty");
    expect("null prompt", mambart_submit(m, NULL, 3, NULL, &opt, &r), MAMBART_ERR_INVALID_ARGUMENT,
           "prompt is NULL");
    opt.n_stop_token_ids = 2;
    expect("null stop ids", mambart_submit(m, prompt, np, NULL, &opt, &r),
           MAMBART_ERR_INVALID_ARGUMENT, "stop_token_ids");
    mambart_request_options_init(&opt);
    opt.struct_size = 1;
    expect("request bad struct_size", mambart_submit(m, prompt, np, NULL, &opt, &r),
           MAMBART_ERR_INVALID_ARGUMENT, "struct_size");

    /* Greedy generation (the Python side compares the tokens with Generator.generate). */
    mambart_request_options_init(&opt);
    opt.max_new_tokens = 12;
    opt.ignore_eos = 1;
    opt.keep_state = 1;
    expect("submit", mambart_submit(m, prompt, np, NULL, &opt, &r), MAMBART_OK, NULL);
    {
        int32_t got[64];
        size_t total = 0;
        finished = 0;
        while (!finished) {
            size_t k = 0;
            if (mambart_request_read(r, got + total, 3, &k, -1.0, &finished) != MAMBART_OK) break;
            total += k;
        }
        printf("streamed");
        for (size_t i = 0; i < total; ++i) printf(" %d", got[i]);
        printf("\n");
    }
    print_tokens("greedy", r);
    expect("state", mambart_request_state(r, &s), MAMBART_OK, NULL);
    printf("state tokens %lld\n", (long long)mambart_state_num_tokens(s));
    mambart_request_free(r);
    expect("freed request", mambart_request_wait(r, 0, &finished), MAMBART_ERR_HANDLE, NULL);
    /* Continue from the kept state. */
    opt.keep_state = 0;
    opt.max_new_tokens = 5;
    expect("continue", mambart_submit(m, NULL, 0, s, &opt, &r), MAMBART_OK, NULL);
    mambart_request_wait(r, -1.0, &finished);
    print_tokens("continued", r);
    expect("no kept state", mambart_request_state(r, &s2),
           MAMBART_ERR_INVALID_ARGUMENT, "keep_state");
    mambart_request_free(r);

    /* A state from another model. */
    {
        mambart_model* other = NULL;
        expect("load other", mambart_model_load(argv[2], NULL, &other), MAMBART_OK, NULL);
        expect("state of another model", mambart_submit(other, prompt, np, s, &opt, &r),
               MAMBART_ERR_STATE, "another model");
        mambart_model_free(other);
        expect("freed model", mambart_submit(other, prompt, np, NULL, &opt, &r),
               MAMBART_ERR_HANDLE, NULL);
    }
    mambart_state_free(s);
    expect("freed state", mambart_submit(m, prompt, np, s, &opt, &r), MAMBART_ERR_HANDLE, "start");

    /* Cancel, and a full queue (max_queue 1): a long request runs, one waits, the next is busy. */
    {
        mambart_request *a = NULL, *b = NULL, *c = NULL;
        mambart_result res;
        opt.max_new_tokens = 1000000;
        expect("long a", mambart_submit(m, prompt, np, NULL, &opt, &a), MAMBART_OK, NULL);
        mambart_request_read(a, buf, 8, &n, -1.0, &finished); /* a is running */
        expect("queued b", mambart_submit(m, prompt, np, NULL, &opt, &b), MAMBART_OK, NULL);
        mambart_status st = mambart_submit(m, prompt, np, NULL, &opt, &c);
        /* b may have been admitted already (then c queues): busy needs a full queue */
        if (st == MAMBART_OK) {
            mambart_status st2 = mambart_submit(m, prompt, np, NULL, &opt, &r);
            expect("busy", st2, MAMBART_ERR_BUSY, "busy");
            if (st2 == MAMBART_OK) mambart_request_free(r);
        } else {
            expect("busy", st, MAMBART_ERR_BUSY, "busy");
        }
        expect("result before finish", mambart_request_result(a, &res),
               MAMBART_ERR_INVALID_ARGUMENT, "not finished");
        expect("cancel", mambart_request_cancel(a), MAMBART_OK, NULL);
        mambart_request_wait(a, -1.0, &finished);
        expect("cancelled result", mambart_request_result(a, &res), MAMBART_OK, NULL);
        printf("%s cancelled finish\n", res.finish_reason == MAMBART_FINISH_CANCELLED ? "ok" : "FAIL");
        if (res.finish_reason != MAMBART_FINISH_CANCELLED) ++failures;
        mambart_request_free(a);
        mambart_request_free(b); /* cancels */
        if (c) mambart_request_free(c);
    }
    mambart_model_free(m);
    printf("failures %d\n", failures);
    return failures ? 1 : 0;
}
