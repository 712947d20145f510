// _C bindings of state files (cpp/state_file.h), the model fingerprint and the prompt cache
// (cpp/prefix_cache.h): python/mambart/state.py wraps them (load_state, SequenceState.save,
// model_fingerprint, PromptCache). Registered after module.cpp's Generator and SequenceState.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "generator.h"
#include "layers/registry.h"
#include "prefix_cache.h"
#include "state_file.h"
#include "release_gil.h"

namespace py = pybind11;
using namespace mambart;

namespace {

// A read-only numpy view of `data` (shape `shape`) that keeps `owner` (the StateFile) alive.
template <typename T>
py::array view(const std::vector<T>& data, const std::vector<int64_t>& shape, py::handle owner) {
    py::array_t<T> a(std::vector<py::ssize_t>(shape.begin(), shape.end()), data.data(), owner);
    a.attr("setflags")(py::arg("write") = false);
    return std::move(a);
}

std::shared_ptr<SequenceState> mutable_state(std::shared_ptr<const SequenceState> s) {
    return std::const_pointer_cast<SequenceState>(std::move(s));  // pybind11 holds non-const
}

}  // namespace

void register_state_files(py::module_& m) {
    py::class_<StateFile, std::shared_ptr<StateFile>>(
        m, "StateFile", "A state file read into host memory (read_state_file).")
        .def_property_readonly("fingerprint",
                               [](const StateFile& f) { return f.model.fingerprint; })
        .def_property_readonly("dtype", [](const StateFile& f) { return f.model.dtype; })
        .def_property_readonly("architecture",
                               [](const StateFile& f) { return f.model.architecture; })
        .def_property_readonly("layer_types",
                               [](const StateFile& f) -> py::object {
                                   if (!f.model.has_layer_types) return py::none();
                                   return py::cast(f.model.layer_types);
                               })
        .def_readonly("version", &StateFile::version)
        .def_readonly("fed", &StateFile::fed)
        .def_property_readonly("rng",
                               [](const StateFile& f) -> py::object {
                                   if (!f.has_rng) return py::none();
                                   return py::make_tuple(f.seed, f.stream, f.counter);
                               })
        .def_property_readonly("spec",
                               [](const StateFile& f) {  // [{name, shape, layers, dtype}]
                                   py::list out;
                                   for (const StateTensor& t : f.tensors) {
                                       py::dict e;
                                       e["name"] = t.name;
                                       e["shape"] = py::cast(t.shape);
                                       e["layers"] = py::cast(t.layers);
                                       e["dtype"] = t.bf16 ? "BF16" : "F32";  // as stored
                                       out.append(e);
                                   }
                                   return out;
                               })
        .def_property_readonly("tensors",
                               [](py::object self) {  // {name: read-only array view}
                                   const StateFile& f = self.cast<const StateFile&>();
                                   py::dict out;
                                   for (const StateTensor& t : f.tensors)
                                       out[py::str(t.name)] = view(t.data, t.shape, self);
                                   return out;
                               })
        .def_property_readonly("tokens",
                               [](py::object self) {
                                   const StateFile& f = self.cast<const StateFile&>();
                                   return view(f.tokens, {int64_t(f.tokens.size())}, self);
                               })
        .def_property_readonly("logits", [](py::object self) -> py::object {
            const StateFile& f = self.cast<const StateFile&>();
            if (f.logits.empty()) return py::none();
            return view(f.logits, {int64_t(f.logits.size())}, self);
        });

    m.def(
        "read_state_file",
        [](const std::string& path) {
            ReleaseGil release;
            return std::make_shared<StateFile>(read_state_file(path, layer_types()));
        },
        py::arg("path"), "Reads and validates a state file (StateError naming it otherwise).");
    m.def(
        "write_state_file",
        [](const std::string& path, const StateFile& f) {
            ReleaseGil release;
            write_state_file(path, f);
        },
        py::arg("path"), py::arg("file"), "Writes a state file atomically.");
    m.def(
        "save_state",
        [](const std::string& path, const SequenceState& s, const std::string& fingerprint,
           const std::string& dtype, const std::string& architecture,
           const std::vector<std::string>& layer_types) {
            StateIdentity id{fingerprint, dtype, architecture, true, layer_types};
            ReleaseGil release;
            write_state_file(path, state_file_of(s, id));
        },
        py::arg("path"), py::arg("state"), py::arg("fingerprint"), py::arg("dtype"),
        py::arg("architecture"), py::arg("layer_types"),
        "Writes a device state with its model identity to a state file (atomically).");
    m.def(
        "state_file_bytes",
        [](const StateFile& f) { return py::bytes(state_file_bytes(f)); }, py::arg("file"),
        "The bytes write_state_file writes (tests of the format).");
    m.def(
        "model_fingerprint",
        [](const std::string& model_dir) {
            ReleaseGil release;
            return model_fingerprint(model_dir);
        },
        py::arg("model_dir"), "sha256 identity of a model directory (cpp/state_file.h).");

    py::class_<PrefixCache, std::shared_ptr<PrefixCache>>(
        m, "PrefixCache", "The exact-prefix prompt cache (cpp/prefix_cache.h).")
        .def(py::init<size_t>(), py::arg("max_bytes"))
        .def(
            "lookup",
            [](PrefixCache& c, const std::string& key, const std::vector<int32_t>& tokens) {
                return mutable_state(c.lookup(key, tokens.data(), tokens.size()));
            },
            py::arg("key"), py::arg("tokens"))
        .def(
            "insert",
            [](PrefixCache& c, const std::string& key, std::shared_ptr<SequenceState> s) {
                return c.insert(key, std::move(s));
            },
            py::arg("key"), py::arg("state"))
        .def("clear", &PrefixCache::clear)
        .def_property_readonly("max_bytes", &PrefixCache::max_bytes)
        .def("stats",
             [](const PrefixCache& c) {
                 const PrefixCache::Stats s = c.stats();
                 py::dict d;
                 d["max_bytes"] = s.max_bytes;
                 d["bytes"] = s.bytes;
                 d["entries"] = s.entries;
                 d["hits"] = s.hits;
                 d["misses"] = s.misses;
                 return d;
             })
        .def("_collide_hashes_for_testing", &PrefixCache::collide_hashes_for_testing);

    auto gen = py::reinterpret_borrow<py::class_<Generator>>(m.attr("Generator"));
    gen.def_property_readonly("fingerprint", &Generator::fingerprint)
        .def_property_readonly("prompt_cache_key", &Generator::prompt_cache_key)
        .def_property(
            "prompt_cache", &Generator::prompt_cache,
            [](Generator& g, std::shared_ptr<PrefixCache> c) { g.set_prompt_cache(std::move(c)); })
        .def(
            "state_from_file",
            [](Generator& g, const StateFile& f, const std::string& source, bool check_identity) {
                ReleaseGil release;
                return g.state_from_file(f, source, check_identity);
            },
            py::arg("file"), py::arg("source") = "", py::arg("check_identity") = true,
            "The file's state on this generator's device; check_identity False when the caller "
            "checked the model identity (SequenceState._check_model).");
}
