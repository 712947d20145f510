// libFuzzer target: the C++ safetensors reader (cpp/safetensors.cpp) on arbitrary bytes, built
// with ASan + UBSan by tests/fuzz/build_libfuzzer.sh. The bytes are served from a memfd (the
// reader maps a path). A file the reader accepts is then read end to end, every tensor
// converted to fp32, so an accepted-but-lying header shows up as an out-of-bounds read.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "dtype.h"
#include "error.h"
#include "safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static int fd = -1;
    if (fd < 0) fd = memfd_create("fuzz.safetensors", 0);
    if (fd < 0) return 0;
    if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) return 0;
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    try {
        mambart::SafetensorsFile f(path);
        uint64_t total = 0;
        std::vector<float> buf;
        for (const auto& kv : f.tensors()) {
            const mambart::TensorInfo& t = kv.second;
            const size_t n = size_t(t.numel());
            if (n * mambart::dtype_size(t.dtype) != t.nbytes) __builtin_trap();
            total += t.nbytes;
            if (n > 0 && n <= (size_t(1) << 20)) {
                buf.resize(n);
                mambart::convert_to_f32(t.data, t.dtype, buf.data(), n);
            }
        }
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | data[i];
        if (8 + hlen + total != size) __builtin_trap();  // exact coverage was promised
    } catch (const mambart::ModelLoadError&) {
    }
    return 0;
}
