// L1 data: a strict, zero-copy safetensors reader.
//
// The file is memory-mapped read-only; tensors are views into the mapping. Validation is as strict
// as the format's own rules: header length bound and inside the file, the header a JSON object,
// known dtypes, integer shapes with no overflow, data_offsets inside the data section, no
// overlaps, the tensors covering the data section exactly, and shape x dtype == bytes.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dtype.h"

namespace mambart {

struct TensorInfo {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    const void* data = nullptr;  // points into the mapping
    size_t nbytes = 0;
    int64_t numel() const;
};

class SafetensorsFile {
 public:
    // Maps and validates `path`; throws ModelLoadError naming the file and the problem.
    // `quantized`: I8 and U8 tensors are accepted too (a quantized model's file, issue 18);
    // otherwise only F32, F16 and BF16.
    explicit SafetensorsFile(const std::string& path, bool quantized = false);
    ~SafetensorsFile();
    SafetensorsFile(const SafetensorsFile&) = delete;
    SafetensorsFile& operator=(const SafetensorsFile&) = delete;

    const std::string& path() const { return path_; }
    bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
    // Throws ModelLoadError naming the file and tensor when absent.
    const TensorInfo& get(const std::string& name) const;
    const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
    size_t file_size() const { return size_; }

    // Largest header accepted (the format's own limit is 100 MB).
    static constexpr uint64_t kMaxHeaderBytes = 100u * 1000u * 1000u;

 private:
    std::string path_;
    void* map_ = nullptr;
    size_t size_ = 0;
    std::map<std::string, TensorInfo> tensors_;
};

}  // namespace mambart
