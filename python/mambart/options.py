"""The runtime options, in one place (docs/options.md; the table is cpp/options.cpp's).

Every switch of the runtime is an option with a name, an environment variable and a default.
An option set here (or with the CLI's `-o NAME=VALUE`) wins over its environment variable; it
applies to generators and backends created afterwards.

    >>> import mambart
    >>> mambart.set_options(cuda_graphs=False, cublas_min_rows=16)
    >>> mambart.options()["cuda_graphs"]
    '0'
    >>> mambart.set_options(cuda_graphs=None)   # back to the environment / default
"""

from __future__ import annotations

from typing import Dict, List

from . import _C


def options() -> Dict[str, str]:
    """Every option's value now (text, as its environment variable would hold it)."""
    return dict(_C.options())


def option_table() -> List[dict]:
    """Every option: name, env, kind (bool, int, bytes, choice, path), choices, default, help."""
    return list(_C.option_table())


def _text(name: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if value == "":
            raise ValueError(f"option {name}: use None, not '', to clear a setting")
        return value
    import os

    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"option {name}: expected a bool, int, str or None, got "
                    f"{type(value).__name__}")


def set_options(**values) -> None:
    """Sets options by name (`cuda_graphs=False`, `cuda_ssd="recurrent"`, `cache_dir=...`);
    None clears a setting. All values are checked before any is set: ValueError names the
    option and what it allows."""
    texts = {name: _text(name, v) for name, v in values.items()}
    for name, t in texts.items():
        _C.check_option(name, t)
    for name, t in texts.items():
        _C.set_option(name, t)
