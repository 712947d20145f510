"""`python -m mambart ...` runs the command line (see mambart.cli); `python -m mambart
--cmake-dir | --include-dir | --lib-dir | --pkgconfig-dir` prints where the installed package
keeps the C API (libmambart, mambart.h, its CMake package and pkg-config files)."""

import sys
from pathlib import Path

_DIRS = {"--cmake-dir": "lib/cmake/mambart", "--include-dir": "include", "--lib-dir": "lib",
         "--pkgconfig-dir": "lib/pkgconfig"}


def _c_api_dir(flag: str) -> int:
    d = Path(__file__).absolute().parent / _DIRS[flag]
    if not d.is_dir():
        print(f"mambart: {d} does not exist (this installation has no C API files)",
              file=sys.stderr)
        return 1
    print(d)
    return 0


if len(sys.argv) == 2 and sys.argv[1] in _DIRS:
    sys.exit(_c_api_dir(sys.argv[1]))

from .cli import main  # noqa: E402

sys.exit(main())
