// L1 data: the mambart model configuration (config.json, schema in docs/format.md).
//
// A model is a list of layers. ModelConfig holds what the model itself owns (sizes of the
// embedding, head and residual stream, the norm, token ids, dtype) and one LayerConfig per
// layer; each layer type's fields, validation, tensors and state are defined by its unit under
// cpp/layers/<type>/ (registry: cpp/layers/registry.h). Nothing here branches on a layer type.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtype.h"

namespace mambart {

enum class NormKind { RMSNorm, LayerNorm };

class ConfigReader;  // cpp/config_reader.h: typed reads of one JSON object, errors name the key
struct ModelConfig;

// A tensor of model.safetensors, named in full ("layers.3.mixer.in_proj.weight").
struct TensorSpec {
    std::string name;
    std::vector<int64_t> shape;
    // A large matrix (rows = output features, cols = input features, after flattening):
    // stored and placed in the model's dtype. Otherwise a small parameter, placed as fp32.
    bool matrix = false;
    // Small parameters only: the parameter is A_log and is placed as -exp(A_log).
    bool neg_exp = false;
    // Small parameters only: converted files store it as float32 whatever their dtype (tiny,
    // and it feeds exponentials); other small parameters are stored in the model's dtype.
    bool store_fp32 = false;
    // Large matrices only: the quantization config.json records for it (docs/format.md), and
    // its group size (weights per scale along K; Int8: the row, cols). Its scales are the
    // tensor `name + "_scale"`, (rows) for Int8 and (rows, cols / group) for Int4.
    QuantScheme quant = QuantScheme::None;
    int64_t group = 0;
};

// One per-sequence state tensor of a layer, e.g. a conv window or an SSM state: fp32, or for
// an SSM state (`ssm` true) the model's state_dtype (option state_dtype, issue 18).
struct StateSpec {
    std::string name;            // "conv", "ssm", ...: the tensor name in state files
    std::vector<int64_t> shape;  // per sequence
    bool ssm = false;            // stored in ModelConfig::state_dtype (else always fp32)
    int64_t numel() const;
};

// The parsed config of one layer: its unit's fields. Immutable once parsed; shared.
class LayerConfig {
 public:
    virtual ~LayerConfig() = default;
    virtual const char* type() const = 0;
    // The layer's tensors (names relative to "layers.{i}.": the caller prefixes them).
    virtual std::vector<TensorSpec> tensors(const ModelConfig& m) const = 0;
    // The layer's per-sequence state.
    virtual std::vector<StateSpec> state(const ModelConfig& m) const = 0;
    // The entry of config.json's `layers` list that gives this config back (JSON text).
    virtual std::string to_json() const = 0;
    // The most tokens a sequence may hold in this layer's state (an attention layer's KV cache);
    // 0: unbounded (a recurrent state).
    virtual int64_t max_context() const { return 0; }
    // Whether the layer norms its own input (Zamba2's hybrid layer): the model then has no block
    // norm for it (no layers.{i}.norm.* tensors) and hands it the raw residual stream.
    virtual bool norms_own_input() const { return false; }
    // Whether the layer reads the embedding output (LayerIO::embedding), kept by the model.
    virtual bool reads_embedding() const { return false; }
    // Whether the layer runs with state_dtype bfloat16 (its SSM state tensors, StateSpec::ssm,
    // stored as bf16). False for a layer whose recurrent state has no bf16 form yet (Mamba-3):
    // the model then refuses the option at load.
    virtual bool supports_bf16_state() const { return true; }
};

// What the config reader needs of the layer registry (cpp/layers/registry.h), passed in so
// that this level does not include the levels above it.
class LayerTypes {
 public:
    virtual ~LayerTypes() = default;
    virtual bool known(const std::string& type) const = 0;
    virtual std::string names() const = 0;  // "mamba1, mamba2, mamba3"
    // Types the flat form of format 1 can hold (its fixed key set), and their names.
    virtual bool flat(const std::string& type) const = 0;
    virtual std::string flat_names() const = 0;
    // Parses a layer of type `type` from `r` (every key of the layer is read through `r`, whose
    // errors name the file, the layer and the key).
    virtual std::shared_ptr<const LayerConfig> parse(const std::string& type, ConfigReader& r,
                                                     const ModelConfig& m) const = 0;
};

struct ModelConfig {
    // The model's family ("mamba1", "mamba2", ...): a name for people; the layers decide.
    std::string architecture;
    int64_t d_model = 0;            // d
    int64_t n_layer = 0;
    int64_t vocab_size = 0;         // V: rows that take part in logits and sampling
    int64_t vocab_size_padded = 0;  // Vp: rows of embedding / lm_head
    NormKind norm = NormKind::RMSNorm;
    float norm_eps = 1e-5f;
    bool residual_in_fp32 = true;
    bool tie_embeddings = true;
    int64_t bos_token_id = -1;      // -1: none
    int64_t eos_token_id = -1;
    int64_t pad_token_id = -1;
    DType dtype = DType::F32;       // storage dtype of the large matrices
    // Storage of the SSM state tensors (StateSpec::ssm): F32, or BF16 with the option
    // state_dtype (issue 18). Not in config.json: the Model sets it at load.
    DType state_dtype = DType::F32;
    // Quantized matrices (config.json "quantization", issue 18): full tensor name -> scheme;
    // empty for an unquantized model. int4_group: weights per int4 scale along K.
    std::map<std::string, QuantScheme> quant;
    int64_t int4_group = 0;
    // Granite-4.0-H's scalars (1: none; config keys of the same names, optional):
    //   h0 = embedding(ids) * embedding_multiplier;
    //   each block: h = h + layer(norm(h)) * residual_multiplier;
    //   logits = lm_head(norm_f(h)) / logits_scaling.
    double embedding_multiplier = 1.0;
    double residual_multiplier = 1.0;
    double logits_scaling = 1.0;
    std::vector<std::shared_ptr<const LayerConfig>> layers;  // n_layer entries

    // Every tensor of model.safetensors the config implies, in load order: embedding, norm_f,
    // lm_head (untied), then per layer its block norm and the layer's own tensors.
    std::vector<TensorSpec> tensors() const;
    // Number of parameters implied by the config (tied head counted once).
    int64_t num_params() const;
    // The layer types, e.g. "mamba1" when every layer is one, else "mamba2, attention, ...".
    std::string layer_types_summary() const;
    // The most tokens a sequence may hold: the smallest of the layers' max_context(), 0 when
    // every layer's state is recurrent (unbounded).
    int64_t max_context() const;

    // Parses and validates `path` (at most kMaxConfigBytes); throws ModelLoadError naming the
    // file and key.
    static ModelConfig from_file(const std::string& path, const LayerTypes& types);
    // Parses JSON text; `origin` names the source in error messages.
    static ModelConfig from_json_text(const std::string& text, const std::string& origin,
                                      const LayerTypes& types);
};

constexpr int64_t kMaxConfigBytes = 16 << 20;  // a config.json is a few KB

std::string shape_str(const std::vector<int64_t>& s);

}  // namespace mambart
