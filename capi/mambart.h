/* mambart C API (issue 14): load a Mamba-family model, submit generation requests to its
 * continuous-batching engine from any thread, read their tokens, cancel them, keep and continue
 * their states. C99; no C++ types or exceptions cross this boundary.
 *
 * Conventions
 *   - Every function that can fail returns a mambart_status; MAMBART_OK is 0. On failure the
 *     message is available from mambart_last_error() (this thread's last failed call) and, for
 *     calls given a handle, from that handle's *_error() function until its next call.
 *   - Handles are opaque. A NULL, freed or foreign handle is reported as MAMBART_ERR_HANDLE,
 *     never dereferenced.
 *   - Text: the C API takes and returns token ids. Turn text into ids with the model's
 *     tokenizer.json (e.g. the Hugging Face `tokenizers` library, or its Rust/C bindings);
 *     stop strings are matched by the engine on the bytes of the generated tokens, read from the
 *     model directory's tokenizer.json, and mambart_token_bytes() gives those bytes for output.
 *   - Threads: every function is thread-safe. Token callbacks run on the engine's thread and
 *     must return quickly and must not call back into the library.
 *   - Environment: the MAMBART_* variables (docs/options.md) are read in mambart_model_load,
 *     on its caller's thread (do not change the environment from another thread meanwhile:
 *     getenv is not safe against a concurrent setenv); the library's own threads never read it.
 *
 * Build against it with CMake (find_package(mambart) -> target mambart::mambart) or pkg-config
 * (pkg-config --cflags --libs mambart); `python -m mambart --cmake-dir / --include-dir /
 * --lib-dir` print where the installed package keeps them.
 */
#ifndef MAMBART_H
#define MAMBART_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MAMBART_API __declspec(dllexport)
#else
#define MAMBART_API __attribute__((visibility("default")))
#endif

/* 2: state files (mambart_state_save / _load), the prompt cache (load option, statistics). */
#define MAMBART_C_API_VERSION 2

typedef enum mambart_status {
    MAMBART_OK = 0,
    MAMBART_ERR_INVALID_ARGUMENT = 1, /* a bad parameter: the message names it */
    MAMBART_ERR_MODEL_LOAD = 2,       /* the model directory or a file in it: path and tensor */
    MAMBART_ERR_UNSUPPORTED = 3,      /* valid, but not in this build or on this device */
    MAMBART_ERR_BUSY = 4,             /* the engine's queue is full: try again later */
    MAMBART_ERR_OUT_OF_MEMORY = 5,    /* refused up front: the estimate and the limit */
    MAMBART_ERR_HANDLE = 6,           /* a NULL, freed or foreign handle */
    MAMBART_ERR_STATE = 7,            /* a state that does not belong to this model, or a state
                                         file that is not one (malformed, not a regular file,
                                         unreadable or unwritable): the message names the file */
    MAMBART_ERR_RUNTIME = 8           /* anything else (a device error, a failed request) */
} mambart_status;

typedef struct mambart_model mambart_model;     /* a loaded model and its engine */
typedef struct mambart_request mambart_request; /* one submitted generation */
typedef struct mambart_state mambart_state;     /* one sequence's state (immutable) */

/* Why a request ended (mambart_result.finish_reason). */
typedef enum mambart_finish {
    MAMBART_FINISH_NONE = 0, /* still running */
    MAMBART_FINISH_LENGTH = 1,
    MAMBART_FINISH_EOS = 2,
    MAMBART_FINISH_STOP_TOKEN = 3,
    MAMBART_FINISH_STOP_STRING = 4,
    MAMBART_FINISH_CANCELLED = 5,
    MAMBART_FINISH_TIMEOUT = 6,
    MAMBART_FINISH_ERROR = 7
} mambart_finish;

/* The library's version ("0.1.0") and the C API version it implements. */
MAMBART_API const char* mambart_version(void);
MAMBART_API int mambart_c_api_version(void);
/* The message of this thread's last failed call ("" if none). Valid until its next call. */
MAMBART_API const char* mambart_last_error(void);
/* A status as text ("MAMBART_ERR_BUSY"). */
MAMBART_API const char* mambart_status_name(mambart_status s);

/* ---- models --------------------------------------------------------------------------------- */
typedef struct mambart_load_options {
    size_t struct_size;  /* sizeof(mambart_load_options): set by mambart_load_options_init */
    const char* device;  /* "cpu" (default), "cuda", "cuda:N" or "auto" */
    const char* dtype;   /* NULL: the stored dtype; "float32", "float16" or "bfloat16" */
    /* Engine: decode slots at most (0: 256), queue bound before MAMBART_ERR_BUSY (0: 1024). */
    int64_t max_slots;
    int64_t max_queue;
    /* The prompt cache's budget in bytes (0: off). With it on, a request submitted without a
     * start state starts from the longest cached prefix of its prompt and prefills only the
     * rest; each prompt's state and each request's final state are cached (least recently used
     * ones evicted beyond the budget). Outputs are those of uncached runs. The budget counts
     * in the memory check of every submission. */
    size_t prompt_cache_bytes;
} mambart_load_options;

MAMBART_API void mambart_load_options_init(mambart_load_options* o);
/* Loads a mambart model directory (config.json + model.safetensors, as written by
 * `mambart convert`). `options` may be NULL. Reads the MAMBART_* environment variables. */
MAMBART_API mambart_status mambart_model_load(const char* model_dir,
                                              const mambart_load_options* options,
                                              mambart_model** out);
MAMBART_API void mambart_model_free(mambart_model* m); /* NULL or freed: ignored */
MAMBART_API const char* mambart_model_error(const mambart_model* m);
MAMBART_API int64_t mambart_model_vocab_size(const mambart_model* m);  /* -1: bad handle */
MAMBART_API int32_t mambart_model_eos_token_id(const mambart_model* m); /* -1: none */
/* The bytes token `id` adds to the text (from tokenizer.json; none for special tokens);
 * *len gets their count. NULL when the model has no tokenizer.json or id is out of range. */
MAMBART_API const char* mambart_token_bytes(mambart_model* m, int32_t id, size_t* len);
/* Engine counters: requests running / queued, decode steps, rows decoded over them, tokens;
 * the prompt cache's hits and misses (lookups of requests without a start state), the prompt
 * tokens its hits served (not prefilled) and the prompt tokens prefilled, its entries, bytes and
 * budget (zeros when the cache is off). */
typedef struct mambart_stats {
    int64_t running, prefilling, queued, slots, steps, rows_decoded, tokens_generated,
        submitted, finished, cancelled, rejected;
    int64_t cache_hits, cache_misses, cached_tokens, prefilled_tokens, cache_entries,
        cache_bytes, cache_max_bytes;
} mambart_stats;
MAMBART_API mambart_status mambart_model_stats(mambart_model* m, mambart_stats* out);

/* ---- requests ------------------------------------------------------------------------------- */
typedef void (*mambart_token_callback)(void* user, const int32_t* tokens, size_t n, int finished);

typedef struct mambart_request_options {
    size_t struct_size;         /* set by mambart_request_options_init */
    int64_t max_new_tokens;     /* 64 */
    float temperature;          /* 0: greedy */
    int64_t top_k;              /* 0: off */
    float top_p;                /* 1: off */
    float min_p;                /* 0: off */
    float repetition_penalty;   /* 1: off */
    uint64_t seed;              /* 0 */
    const int32_t* stop_token_ids;
    size_t n_stop_token_ids;
    const char* const* stop_strings; /* UTF-8, matched on the generated bytes */
    size_t n_stop_strings;
    int ignore_eos;             /* 0 */
    double timeout_s;           /* 0: none */
    int keep_state;             /* 1: mambart_request_state() gives the final state */
    mambart_token_callback on_tokens; /* NULL: read the tokens with mambart_request_read */
    void* user;
} mambart_request_options;

MAMBART_API void mambart_request_options_init(mambart_request_options* o);
/* Queues a request: `prompt` (n ids) after `start` (NULL: a fresh sequence; `prompt` may then be
 * empty only with a start). Returns MAMBART_ERR_BUSY at once when the queue is full. */
MAMBART_API mambart_status mambart_submit(mambart_model* m, const int32_t* prompt, size_t n,
                                          const mambart_state* start,
                                          const mambart_request_options* options,
                                          mambart_request** out);
/* Copies up to `cap` unread tokens into `buf` (*n their count), waiting up to `timeout_s`
 * (< 0: without limit) for at least one; *finished becomes 1 once the request has ended and
 * every token was read. */
MAMBART_API mambart_status mambart_request_read(mambart_request* r, int32_t* buf, size_t cap,
                                                size_t* n, double timeout_s, int* finished);
MAMBART_API mambart_status mambart_request_wait(mambart_request* r, double timeout_s,
                                                int* finished);
MAMBART_API mambart_status mambart_request_cancel(mambart_request* r);

typedef struct mambart_result {
    mambart_finish finish_reason;
    size_t n_tokens;             /* generated tokens (mambart_request_tokens copies them) */
    int64_t prompt_tokens;
    int64_t prefill_tokens;
    double prefill_ms, decode_ms;
} mambart_result;
/* After the request has finished (MAMBART_ERR_INVALID_ARGUMENT before). A request that failed
 * returns MAMBART_ERR_RUNTIME with its message, and still fills `out`. */
MAMBART_API mambart_status mambart_request_result(mambart_request* r, mambart_result* out);
MAMBART_API mambart_status mambart_request_tokens(mambart_request* r, int32_t* buf, size_t cap,
                                                  size_t* n);
/* The final state of a finished request submitted with keep_state (free it with
 * mambart_state_free). */
MAMBART_API mambart_status mambart_request_state(mambart_request* r, mambart_state** out);
MAMBART_API const char* mambart_request_error(const mambart_request* r);
MAMBART_API void mambart_request_free(mambart_request* r); /* cancels it if it is running */

/* ---- states --------------------------------------------------------------------------------- */
/* Runs `prompt` through the model (after `from`, which may be NULL) into a new state. */
MAMBART_API mambart_status mambart_prefill(mambart_model* m, const int32_t* prompt, size_t n,
                                           const mambart_state* from, mambart_state** out);
MAMBART_API int64_t mambart_state_num_tokens(const mambart_state* s); /* -1: bad handle */
MAMBART_API void mambart_state_free(mambart_state* s);
/* Writes `s` to the file `path` (the parent directory must exist), with its model's identity
 * (fingerprint, dtype, architecture, layer types): the format Python's SequenceState.save
 * writes and mambart.load_state reads. Atomic: a unique temporary file in the same directory,
 * fsynced, renamed over `path`. MAMBART_ERR_STATE naming `path` when it cannot be written. A
 * state keeps what saving needs: it can be saved after its model handle was freed. */
MAMBART_API mambart_status mambart_state_save(const mambart_state* s, const char* path);
/* Reads a state file (written by mambart_state_save or Python's SequenceState.save) for model
 * `m`; continue it with mambart_submit(m, ids, n, *out, ...). MAMBART_ERR_STATE naming the file
 * when it is missing, not a regular file (a FIFO, device or directory is refused before it is
 * opened for reading), malformed or truncated, or a state of another model or dtype. */
MAMBART_API mambart_status mambart_state_load(mambart_model* m, const char* path,
                                              mambart_state** out);

#ifdef __cplusplus
}
#endif

#endif /* MAMBART_H */
