"""The exception type of checkpoint interchange (Hugging Face import / export): see `dlmjax.errors`."""
from dlmjax.errors import InterchangeError

__all__ = ["InterchangeError"]
