#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "error.h"
#include "regular_file.h"
#include "strict_json.h"

namespace mambart {

int64_t TensorInfo::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

namespace {

// The dtype strings of the safetensors format. Anything else (or an integer dtype) is refused
// with a message naming it: a Mamba checkpoint holds only floating-point tensors.
bool parse_st_dtype(const std::string& s, DType* out, bool quantized) {
    if (quantized && s == "I8") { *out = DType::I8; return true; }
    if (quantized && s == "U8") { *out = DType::U8; return true; }
    if (s == "F32") { *out = DType::F32; return true; }
    if (s == "F16") { *out = DType::F16; return true; }
    if (s == "BF16") { *out = DType::BF16; return true; }
    return false;
}

bool known_st_dtype(const std::string& s) {
    static const char* kAll[] = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16",
                                 "BF16", "I32", "U32", "F32", "F64", "I64", "U64"};
    for (const char* k : kAll)
        if (s == k) return true;
    return false;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path, bool quantized) : path_(path) {
    auto fail = [&](const std::string& what) -> ModelLoadError {
        return ModelLoadError(str_cat(path_, ": invalid safetensors file: ", what));
    };
    struct stat st;
    int fd = open_regular_file(path, "the weights file", &st);  // never blocks on a FIFO
    size_ = static_cast<size_t>(st.st_size);
    if (size_ < 8) {
        ::close(fd);
        throw fail(str_cat("file is ", size_, " bytes, shorter than the 8-byte header length"));
    }
    map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (map_ == MAP_FAILED) {
        map_ = nullptr;
        throw ModelLoadError(str_cat(path_, ": mmap failed: ", std::strerror(errno)));
    }
    try {
        const uint8_t* base = static_cast<const uint8_t*>(map_);
        uint64_t header_len = 0;
        for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];  // little endian
        if (header_len > kMaxHeaderBytes)
            throw fail(str_cat("header length ", header_len, " exceeds the limit of ",
                               kMaxHeaderBytes, " bytes"));
        if (header_len > size_ - 8)
            throw fail(str_cat("header length ", header_len, " runs past the end of the file (",
                               size_, " bytes): truncated or not a safetensors file"));
        const char* hdr = reinterpret_cast<const char*>(base + 8);
        nlohmann::json j;
        try {
            j = parse_json_strict(hdr, hdr + header_len);
        } catch (const StrictJsonError& e) {
            if (e.duplicate_key) throw fail(str_cat("header has a ", e.what()));
            throw fail(str_cat("header is not valid JSON (", e.what(), ")"));
        }
        if (!j.is_object()) throw fail("header is not a JSON object");
        const uint64_t data_start = 8 + header_len;
        const uint64_t data_size = size_ - data_start;

        struct Span { uint64_t begin, end; std::string name; };
        std::vector<Span> spans;
        for (auto it = j.begin(); it != j.end(); ++it) {
            const std::string& name = it.key();
            if (name == "__metadata__") {
                if (!it->is_object()) throw fail("__metadata__ is not an object");
                for (auto m = it->begin(); m != it->end(); ++m)
                    if (!m->is_string()) throw fail("__metadata__ values must be strings");
                continue;
            }
            const nlohmann::json& t = *it;
            auto tfail = [&](const std::string& what) {
                return fail(str_cat("tensor '", name, "': ", what));
            };
            if (!t.is_object()) throw tfail("entry is not an object");
            for (auto k = t.begin(); k != t.end(); ++k)
                if (k.key() != "dtype" && k.key() != "shape" && k.key() != "data_offsets")
                    throw tfail(str_cat("unknown field '", k.key(), "'"));
            if (!t.contains("dtype") || !t["dtype"].is_string()) throw tfail("missing dtype");
            if (!t.contains("shape") || !t["shape"].is_array()) throw tfail("missing shape");
            if (!t.contains("data_offsets") || !t["data_offsets"].is_array() ||
                t["data_offsets"].size() != 2)
                throw tfail("data_offsets must be [begin, end]");
            const std::string dts = t["dtype"].get<std::string>();
            TensorInfo info;
            info.name = name;
            if (!parse_st_dtype(dts, &info.dtype, quantized)) {
                if (known_st_dtype(dts))
                    throw tfail(str_cat("dtype ", dts, " is not supported (weights must be F32, "
                                        "F16 or BF16", quantized ? "; quantized ones I8 or U8" : "",
                                        ")"));
                throw tfail(str_cat("unknown dtype '", dts, "'"));
            }
            uint64_t numel = 1;
            for (const auto& d : t["shape"]) {
                if (!d.is_number_unsigned()) throw tfail("shape entries must be non-negative integers");
                const uint64_t v = d.get<uint64_t>();
                if (v != 0 && numel > (uint64_t(1) << 62) / v) throw tfail("shape overflows");
                numel *= v;
                info.shape.push_back(static_cast<int64_t>(v));
            }
            for (const auto& o : t["data_offsets"])
                if (!o.is_number_unsigned()) throw tfail("data_offsets must be non-negative integers");
            const uint64_t b = t["data_offsets"][0].get<uint64_t>();
            const uint64_t e = t["data_offsets"][1].get<uint64_t>();
            if (b > e) throw tfail(str_cat("data_offsets [", b, ", ", e, "] are reversed"));
            if (e > data_size)
                throw tfail(str_cat("data_offsets end ", e, " is past the data section (", data_size,
                                    " bytes): truncated file?"));
            const uint64_t expect = numel * dtype_size(info.dtype);
            if (e - b != expect)
                throw tfail(str_cat("shape x dtype is ", expect, " bytes but data_offsets span ",
                                    e - b, " bytes"));
            info.nbytes = static_cast<size_t>(e - b);
            info.data = base + data_start + b;
            spans.push_back({b, e, name});
            tensors_.emplace(name, std::move(info));
        }
        // No overlaps and exact coverage of the data section.
        std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
            return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
        });
        uint64_t pos = 0;
        for (const Span& s : spans) {
            if (s.begin < pos)
                throw fail(str_cat("tensor '", s.name, "' overlaps the previous tensor"));
            if (s.begin > pos)
                throw fail(str_cat("gap of ", s.begin - pos, " bytes before tensor '", s.name,
                                   "': the tensors do not cover the data section exactly"));
            pos = s.end;
        }
        if (pos != data_size)
            throw fail(str_cat(data_size - pos, " trailing bytes after the last tensor: the tensors "
                               "do not cover the data section exactly"));
    } catch (...) {
        ::munmap(map_, size_);
        map_ = nullptr;
        throw;
    }
}

SafetensorsFile::~SafetensorsFile() {
    if (map_) ::munmap(map_, size_);
}

const TensorInfo& SafetensorsFile::get(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
        throw ModelLoadError(str_cat(path_, ": missing tensor '", name, "'"));
    return it->second;
}

}  // namespace mambart
