#include "error.h"

// The exception types are header-only; this translation unit anchors the library's vtables.
namespace mambart {}
