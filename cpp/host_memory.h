// L0 base: how much host memory this process may still take, for the checks that refuse a load
// or a generation up front (with the numbers) instead of letting the OOM killer, a cgroup or an
// address-space limit end the process midway.
#pragma once

#include <cstdint>
#include <string>

namespace mambart {

// Bytes of host memory available to this process now: the kernel's MemAvailable, capped by the
// process's cgroup (memory limit minus its working set; v2 or v1) and by RLIMIT_AS (the limit
// minus the address space already mapped). UINT64_MAX when none of them can be read.
uint64_t host_memory_available();

// `bytes` as "12345678 bytes (11.8 MiB)", for messages.
std::string bytes_text(uint64_t bytes);

}  // namespace mambart
