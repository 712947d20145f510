"""mambart's exception types.

ModelLoadError: a model directory, config or weight file is missing, malformed or inconsistent
    (the message names the file and the tensor or key). A ValueError, so `except ValueError`
    catches every bad-input error mambart raises.
ConversionError: a checkpoint cannot be converted (unknown format, unsupported layers, a tensor
    that contradicts the config); also a ModelLoadError.
"""


class ModelLoadError(ValueError):
    """A model directory, config or weight file is missing, malformed or inconsistent."""


class ConversionError(ModelLoadError):
    """A checkpoint cannot be converted into a mambart model directory."""
