// L0 base: the exception types of the library. Library code never calls exit/abort; every
// failure is one of these, and the Python bindings map them to Python exceptions:
//   InvalidArgument -> ValueError, ModelLoadError -> mambart.ModelLoadError (a ValueError),
//   Unsupported -> NotImplementedError, OutOfMemory -> MemoryError, StateError ->
//   mambart.StateError (a ValueError), Cancelled ->
//   KeyboardInterrupt-free RuntimeError, CudaError / Error -> RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace mambart {

class Error : public std::runtime_error {
 public:
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// A caller passed a bad value (parameter name in the message).
class InvalidArgument : public Error {
 public:
    explicit InvalidArgument(const std::string& msg) : Error(msg) {}
};

// A model directory, config or weight file is missing, malformed or inconsistent (path and
// tensor name in the message).
class ModelLoadError : public Error {
 public:
    explicit ModelLoadError(const std::string& msg) : Error(msg) {}
};

// A valid request this build or backend does not implement.
class Unsupported : public Error {
 public:
    explicit Unsupported(const std::string& msg) : Error(msg) {}
};

// A request would need more memory than its limit allows; refused before allocating (the
// estimate, the limit and the option that sets it in the message).
class OutOfMemory : public Error {
 public:
    explicit OutOfMemory(const std::string& msg) : Error(msg) {}
};

// A state file is malformed, cannot be read or written, or a state does not belong to the model
// it is used with (the path and what differs in the message). Python: mambart.StateError.
class StateError : public Error {
 public:
    explicit StateError(const std::string& msg) : Error(msg) {}
};

// Concatenates its arguments with operator<< into a string.
template <typename... Args>
std::string str_cat(const Args&... args) {
    std::ostringstream os;
    (os << ... << args);
    return os.str();
}

}  // namespace mambart

#define MAMBART_CHECK_ARG(cond, ...)                                              \
    do {                                                                          \
        if (!(cond)) throw ::mambart::InvalidArgument(::mambart::str_cat(__VA_ARGS__)); \
    } while (0)
