"""The one exception type of checkpoint interchange (Hugging Face import / export)."""
from __future__ import annotations


class InterchangeError(ValueError):
    """A checkpoint or its config.json cannot be mapped: a missing or unexpected tensor, a shape that does not fit
    the config, an unsupported config value, an unknown --arch. The message names the tensor or key and what was
    expected. A ValueError, so the command line reports it without a traceback."""
