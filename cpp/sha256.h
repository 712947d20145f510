// L0 base: SHA-256 (FIPS 180-4), for the model fingerprint that state files carry
// (state_file.h). Small and dependency-free: the runtime links no crypto library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mambart {

class Sha256 {
 public:
    Sha256();
    void update(const void* data, size_t n);
    void update(const std::string& s) { update(s.data(), s.size()); }
    std::string hex_digest();  // 64 lowercase hex digits; the object is spent afterwards

 private:
    void block(const uint8_t* p);  // one 64-byte block into h_
    uint32_t h_[8];
    uint8_t buf_[64];
    size_t used_ = 0;     // bytes in buf_
    uint64_t total_ = 0;  // bytes hashed
};

}  // namespace mambart
