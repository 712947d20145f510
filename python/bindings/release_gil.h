// The GIL released around a call into the runtime, after the runtime's snapshot of its
// options' environment variables is refreshed while the GIL is still held (cpp/options.h:
// getenv is not safe against a concurrent putenv, and Python threads change os.environ
// under the GIL). Use it instead of py::gil_scoped_release wherever the call may read options
// (loading, starting a generation or the engine); the per-token reads keep the plain release.
#pragma once

#include <pybind11/pybind11.h>

#include "options.h"

namespace mambart {

class ReleaseGil {
 public:
    ReleaseGil() : refreshed_((refresh_option_environment(), true)) {}
    ReleaseGil(const ReleaseGil&) = delete;
    ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
    bool refreshed_;  // initialised first: the refresh runs before the release below
    pybind11::gil_scoped_release release_;
};

}  // namespace mambart
