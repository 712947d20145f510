"""mambart: a standalone C++/CUDA inference runtime for Mamba-family language models.

    >>> import mambart
    >>> g = mambart.Generator("mamba-130m")
    >>> print(g.generate("The future of AI is", max_new_tokens=32).text)
"""

from .errors import ConversionError, ModelLoadError

try:
    from . import _C
except ImportError as e:  # fail loudly: nothing works without the native core
    raise ImportError(
        "mambart's native module (_C) could not be imported; the package was not built or "
        f"installed correctly ({e}). Reinstall with `pip install .` from the source tree."
    ) from e

from .convert import convert
from .generator import GenerationResult, Generator
from .options import option_table, options, set_options
from .sequences import ScoreResult
from .state import PromptCache, SequenceState, StateError, load_state

__version__ = "0.1.0"

cuda_available = _C.cuda_available

__all__ = [
    "ConversionError",
    "GenerationResult",
    "Generator",
    "ModelLoadError",
    "PromptCache",
    "ScoreResult",
    "SequenceState",
    "StateError",
    "load_state",
    "option_table",
    "options",
    "set_options",
    "convert",
    "cuda_available",
    "__version__",
]
