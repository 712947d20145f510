// Opening files that may be hostile (issue 23): a path is opened non-blocking and checked with
// fstat before anything is read, so a FIFO (whose blocking open waits for a writer forever), a
// device such as /dev/zero, a socket or a directory is refused with a message naming the path.
// Header-only so that every reader (and the libFuzzer builds) can use it without a new source.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include "error.h"

namespace mambart {

inline const char* file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a plain file";
}

// An open read-only descriptor of the regular file `path` (symlinks followed), blocking again
// once checked; `st` receives its fstat. Throws ModelLoadError("<path>: ... <what> ...").
inline int open_regular_file(const std::string& path, const char* what, struct stat* st) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        throw ModelLoadError(str_cat(path, ": cannot open ", what, ": ", std::strerror(errno)));
    if (::fstat(fd, st) != 0) {
        const int err = errno;
        ::close(fd);
        throw ModelLoadError(str_cat(path, ": cannot stat ", what, ": ", std::strerror(err)));
    }
    if (!S_ISREG(st->st_mode)) {
        ::close(fd);
        throw ModelLoadError(str_cat(path, ": ", what, " is not a regular file (",
                                     file_kind(st->st_mode), ")"));
    }
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    return fd;
}

// The whole of the regular file `path`, refused before reading when it is larger than `limit`
// bytes; at most `limit` bytes are read even if the file grows meanwhile.
inline std::string read_regular_file(const std::string& path, const char* what, int64_t limit,
                                     struct stat* st) {
    const int fd = open_regular_file(path, what, st);
    std::string out;
    auto too_large = [&](int64_t n) {
        ::close(fd);
        return ModelLoadError(str_cat(path, ": ", what, " is ", n,
                                      " bytes, more than the limit of ", limit));
    };
    if (st->st_size > limit) throw too_large(st->st_size);
    out.resize(static_cast<size_t>(st->st_size));
    size_t got = 0;
    for (;;) {
        if (got == out.size()) {
            if (static_cast<int64_t>(out.size()) > limit) throw too_large(int64_t(out.size()));
            out.resize(out.size() + 4096);  // the file may have grown: read on, to the limit
        }
        const ssize_t n = ::read(fd, &out[got], out.size() - got);
        if (n < 0) {
            if (errno == EINTR) continue;
            const int err = errno;
            ::close(fd);
            throw ModelLoadError(str_cat(path, ": cannot read ", what, ": ", std::strerror(err)));
        }
        if (n == 0) break;
        got += static_cast<size_t>(n);
    }
    ::close(fd);
    out.resize(got);
    if (static_cast<int64_t>(got) > limit) throw ModelLoadError(str_cat(
        path, ": ", what, " is ", got, " bytes, more than the limit of ", limit));
    return out;
}

}  // namespace mambart
