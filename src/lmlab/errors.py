"""Errors that tell the user what went wrong and how to fix it.

Every error raised for bad input derives from :class:`LmlabError`, so entry points can print the
message without a traceback and exit with a non-zero status.
"""


class LmlabError(Exception):
    """Base class for user-facing errors."""


class ConfigError(LmlabError):
    """The composed config has an unknown key, a bad value or a missing required value."""


class DataError(LmlabError):
    """A data file, split or column is missing, empty, or not decodable."""


class TokenizerError(LmlabError):
    """Text cannot be encoded by the tokenizer, or a tokenizer does not match a checkpoint."""


class CheckpointMismatchError(LmlabError):
    """A checkpoint does not match the model or tokenizer the config asks for."""


class NonFiniteLossError(LmlabError):
    """Training produced a NaN or infinite loss."""
