/* Drives the C API from C (tests/test_c_api.py compiles and runs it): bad handles, bad options,
 * a path that is not a model, invalid token ids, a state from another model, a full queue; then
 * greedy generation, continuing from a kept state, cancel and stop strings; state files (save,
 * load, Python's file, another model's, truncated, corrupt, a directory, a FIFO, missing) and the
 * prompt cache. Prints one line per check ("ok NAME" or "FAIL NAME: ...") and the generated
 * tokens for the Python side to compare.
 *   test_c_api MODEL_DIR OTHER_MODEL_DIR NOT_A_MODEL_DIR WORK_DIR
 * WORK_DIR holds py.state (a state of MODEL_DIR saved by Python) and fifo.state (a FIFO); the
 * program writes its own files there (c.state, for Python to load).                         */
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

static void check(const char* name, int ok) {
    printf("%s %s\n", ok ? "ok" : "FAIL", name);
    if (!ok) ++failures;
}

/* Writes the first `keep` bytes of `src` (all if keep < 0) and then `extra` to `dst`. */
static void copy_file(const char* src, const char* dst, long keep, const char* extra) {
    char buf[1 << 16];
    FILE* in = fopen(src, "rb");
    FILE* out = fopen(dst, "wb");
    size_t n = in ? fread(buf, 1, sizeof buf, in) : 0;
    if (keep >= 0 && (size_t)keep < n) n = (size_t)keep;
    if (out) {
        fwrite(buf, 1, n, out);
        if (extra) fputs(extra, out);
        fclose(out);
    }
    if (in) fclose(in);
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
    if (argc < 5) return 2;
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

    /* State files: save and load round trip; a file Python saved; bad files and paths. */
    char path[4096], other_path[4096], py_path[4096], work[4096];
    snprintf(path, sizeof path, "%s/c.state", argv[4]);
    snprintf(other_path, sizeof other_path, "%s/other.state", argv[4]);
    snprintf(py_path, sizeof py_path, "%s/py.state", argv[4]);
    expect("save", mambart_state_save(s, path), MAMBART_OK, NULL);
    expect("load", mambart_state_load(m, path, &s2), MAMBART_OK, NULL);
    check("loaded tokens", mambart_state_num_tokens(s2) == mambart_state_num_tokens(s));
    expect("continue loaded", mambart_submit(m, NULL, 0, s2, &opt, &r), MAMBART_OK, NULL);
    mambart_request_wait(r, -1.0, &finished);
    print_tokens("loaded_continued", r);
    mambart_request_free(r);
    mambart_state_free(s2);
    expect("load python's", mambart_state_load(m, py_path, &s2), MAMBART_OK, NULL);
    expect("continue python's", mambart_submit(m, NULL, 0, s2, &opt, &r), MAMBART_OK, NULL);
    mambart_request_wait(r, -1.0, &finished);
    print_tokens("py_continued", r);
    mambart_request_free(r);
    mambart_state_free(s2);
    snprintf(work, sizeof work, "%s/truncated.state", argv[4]);
    copy_file(path, work, 100, NULL);
    expect("load truncated", mambart_state_load(m, work, &s2), MAMBART_ERR_STATE,
           "truncated.state: not a valid mambart state file");
    snprintf(work, sizeof work, "%s/short.state", argv[4]);
    copy_file(path, work, 5, NULL);
    expect("load short", mambart_state_load(m, work, &s2), MAMBART_ERR_STATE, "short.state");
    snprintf(work, sizeof work, "%s/trailing.state", argv[4]);
    copy_file(path, work, -1, "garbage");
    expect("load trailing bytes", mambart_state_load(m, work, &s2), MAMBART_ERR_STATE,
           "trailing bytes");
    snprintf(work, sizeof work, "%s/corrupt.state", argv[4]);
    copy_file(argv[0], work, 4096, NULL); /* the start of an executable */
    expect("load corrupt", mambart_state_load(m, work, &s2), MAMBART_ERR_STATE, "corrupt.state");
    expect("load a directory", mambart_state_load(m, argv[4], &s2), MAMBART_ERR_STATE,
           "not a regular file (a directory)");
    snprintf(work, sizeof work, "%s/fifo.state", argv[4]);
    expect("load a FIFO", mambart_state_load(m, work, &s2), MAMBART_ERR_STATE, "(a FIFO)");
    expect("load /dev/zero", mambart_state_load(m, "/dev/zero", &s2), MAMBART_ERR_STATE,
           "a character device");
    snprintf(work, sizeof work, "%s/missing.state", argv[4]);
    expect("load missing", mambart_state_load(m, work, &s2), MAMBART_ERR_STATE, "missing.state");
    check("failed load gives no state", s2 == NULL);
    snprintf(work, sizeof work, "%s/nope/x.state", argv[4]);
    expect("save into a missing directory", mambart_state_save(s, work), MAMBART_ERR_STATE,
           "nope/x.state: cannot write the state file");
    expect("save to a directory", mambart_state_save(s, argv[4]), MAMBART_ERR_STATE,
           "cannot write the state file");
    expect("save null path", mambart_state_save(s, NULL), MAMBART_ERR_INVALID_ARGUMENT, "path");
    expect("save null state", mambart_state_save(NULL, path), MAMBART_ERR_HANDLE, "state");
    expect("load null model", mambart_state_load(NULL, path, &s2), MAMBART_ERR_HANDLE, "model");
    expect("load null out", mambart_state_load(m, path, NULL), MAMBART_ERR_INVALID_ARGUMENT,
           "out");

    /* A state from another model. */
    {
        mambart_model* other = NULL;
        expect("load other", mambart_model_load(argv[2], NULL, &other), MAMBART_OK, NULL);
        expect("state of another model", mambart_submit(other, prompt, np, s, &opt, &r),
               MAMBART_ERR_STATE, "another model");
        expect("load a file of another model", mambart_state_load(other, path, &s2),
               MAMBART_ERR_STATE, "c.state) belongs to another model");
        expect("other prefill", mambart_prefill(other, prompt, np, NULL, &s2), MAMBART_OK, NULL);
        mambart_model_free(other);
        /* a state keeps what saving needs: saved after its model handle was freed */
        expect("save after its model was freed", mambart_state_save(s2, other_path), MAMBART_OK,
               NULL);
        mambart_state_free(s2);
        s2 = NULL;
        expect("load the other model's file", mambart_state_load(m, other_path, &s2),
               MAMBART_ERR_STATE, "other.state) belongs to another model");
        expect("freed model", mambart_submit(other, prompt, np, NULL, &opt, &r),
               MAMBART_ERR_HANDLE, NULL);
    }
    mambart_state_free(s);
    expect("freed state", mambart_submit(m, prompt, np, s, &opt, &r), MAMBART_ERR_HANDLE, "start");

    /* Cancel, and a full queue: on a handle with one decode slot and max_queue 1, a long
     * request runs, the next waits (no slot can take it), the one after is busy. */
    mambart_model_free(m);
    mambart_load_options_init(&lo);
    lo.max_slots = 1;
    lo.max_queue = 1;
    expect("load one slot", mambart_model_load(argv[1], &lo, &m), MAMBART_OK, NULL);
    if (!m) return 1;
    {
        mambart_request *a = NULL, *b = NULL, *c = NULL;
        mambart_result res;
        opt.max_new_tokens = 1000000;
        expect("long a", mambart_submit(m, prompt, np, NULL, &opt, &a), MAMBART_OK, NULL);
        mambart_request_read(a, buf, 8, &n, -1.0, &finished); /* a is running */
        expect("queued b", mambart_submit(m, prompt, np, NULL, &opt, &b), MAMBART_OK, NULL);
        expect("busy", mambart_submit(m, prompt, np, NULL, &opt, &c), MAMBART_ERR_BUSY, "busy");
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

    /* The prompt cache: the same prompt again prefills nothing and gives the same tokens (the
     * two entries: its prompt state and its final state, both found again by the second run). */
    mambart_load_options_init(&lo);
    lo.prompt_cache_bytes = (size_t)-1;
    expect("load huge cache", mambart_model_load(argv[1], &lo, &m), MAMBART_ERR_INVALID_ARGUMENT,
           "prompt_cache_bytes");
    lo.prompt_cache_bytes = 1 << 20;
    expect("load with a cache", mambart_model_load(argv[1], &lo, &m), MAMBART_OK, NULL);
    if (m) {
        mambart_result res;
        mambart_stats st;
        mambart_request_options_init(&opt);
        opt.max_new_tokens = 4;
        opt.ignore_eos = 1;
        expect("cache miss", mambart_submit(m, prompt, np, NULL, &opt, &r), MAMBART_OK, NULL);
        mambart_request_wait(r, -1.0, &finished);
        print_tokens("uncached", r);
        mambart_request_free(r);
        expect("cache hit", mambart_submit(m, prompt, np, NULL, &opt, &r), MAMBART_OK, NULL);
        mambart_request_wait(r, -1.0, &finished);
        print_tokens("cached", r);
        expect("cached result", mambart_request_result(r, &res), MAMBART_OK, NULL);
        check("cached prefill", res.prefill_tokens == 0 && res.prompt_tokens == (int64_t)np);
        mambart_request_free(r);
        expect("stats", mambart_model_stats(m, &st), MAMBART_OK, NULL);
        check("cache stats", st.cache_hits == 1 && st.cache_misses == 1 &&
                                 st.cached_tokens == (int64_t)np &&
                                 st.prefilled_tokens == (int64_t)np && st.cache_entries == 2 &&
                                 st.cache_bytes > 0 && st.cache_max_bytes == 1 << 20);
        mambart_model_free(m);
    }
    printf("failures %d\n", failures);
    return failures ? 1 : 0;
}
