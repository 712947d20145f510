#include "host_memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>

namespace mambart {

namespace {

constexpr uint64_t kNone = UINT64_MAX;

// The first number in `path`; kNone when the file is missing or says "max" (no limit).
uint64_t read_number(const std::string& path) {
    std::ifstream f(path);
    std::string s;
    if (!(f >> s) || s.empty() || s.find_first_not_of("0123456789") != std::string::npos)
        return kNone;
    return std::stoull(s);
}

// The value of `key` in a "key value" file (memory.stat); 0 when absent.
uint64_t stat_value(const std::string& path, const std::string& key) {
    std::ifstream f(path);
    std::string k;
    uint64_t v = 0;
    while (f >> k >> v)
        if (k == key) return v;
    return 0;
}

uint64_t mem_available() {
    std::ifstream f("/proc/meminfo");
    std::string key, unit;
    uint64_t kb = 0;
    while (f >> key >> kb >> unit)
        if (key == "MemAvailable:") return kb * 1024;
    return kNone;
}

// The cgroup's limit minus its working set (usage without the inactive page cache, which the
// kernel reclaims before it would kill), as container runtimes count it. A cgroup namespace
// (containers) mounts the process's own cgroup at the root of /sys/fs/cgroup.
uint64_t cgroup_headroom() {
    struct Files {
        const char *limit, *usage, *stat, *inactive;
    };
    const Files kinds[] = {
        {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
         "inactive_file"},  // v2
        {"/sys/fs/cgroup/memory/memory.limit_in_bytes",
         "/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory/memory.stat",
         "total_inactive_file"},  // v1
    };
    for (const Files& k : kinds) {
        const uint64_t limit = read_number(k.limit);
        if (limit == kNone || limit >= (uint64_t(1) << 60)) continue;  // none (v1: a huge number)
        const uint64_t usage = read_number(k.usage);
        if (usage == kNone) continue;
        const uint64_t inactive = std::min(usage, stat_value(k.stat, k.inactive));
        const uint64_t working = usage - inactive;
        return limit > working ? limit - working : 0;
    }
    return kNone;
}

// RLIMIT_AS minus the address space mapped now (/proc/self/statm's first field, in pages).
uint64_t address_space_headroom() {
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return kNone;
    std::ifstream f("/proc/self/statm");
    uint64_t pages = 0;
    if (!(f >> pages)) return kNone;
    const uint64_t mapped = pages * uint64_t(sysconf(_SC_PAGESIZE));
    return rl.rlim_cur > mapped ? uint64_t(rl.rlim_cur) - mapped : 0;
}

}  // namespace

uint64_t host_memory_available() {
    return std::min({mem_available(), cgroup_headroom(), address_space_headroom()});
}

std::string bytes_text(uint64_t bytes) {
    char buf[64] = "";
    const double b = double(bytes), kib = 1024.0, mib = kib * kib, gib = mib * kib;
    if (b >= gib) std::snprintf(buf, sizeof buf, " (%.1f GiB)", b / gib);
    else if (b >= mib) std::snprintf(buf, sizeof buf, " (%.1f MiB)", b / mib);
    else if (b >= kib) std::snprintf(buf, sizeof buf, " (%.1f KiB)", b / kib);
    return std::to_string(bytes) + " bytes" + buf;
}

}  // namespace mambart
