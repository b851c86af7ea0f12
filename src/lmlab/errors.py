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


class DiskFullError(LmlabError):
    """The disk (or a quota) filled while lmlab wrote a file (the data cache, a checkpoint, an export); what was
    finished is kept for the next run and nothing partial is left."""


class TokenizerError(LmlabError):
    """Text cannot be encoded by the tokenizer, or a tokenizer does not match a checkpoint."""


class ChatTemplateError(LmlabError):
    """A tokenizer's chat template is unsafe (Jinja's sandbox refuses it, or it runs past its render limits) or
    broken (it does not compile, or fails while rendering). ``problem`` says which; the message adds the fix."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem} {fix}")
        self.problem = problem


class CheckpointError(LmlabError):
    """A checkpoint file cannot be read: truncated, empty, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to build something outside lmlab's allow-list, or holds pickled objects."""


class CheckpointMismatchError(LmlabError):
    """A checkpoint does not match the model or tokenizer the config asks for."""


class ExportError(LmlabError):
    """A checkpoint has no equivalent in the export format, or its export does not reproduce it."""


class NonFiniteLossError(LmlabError):
    """Training produced a NaN or infinite loss."""


class RunInterrupted(LmlabError):
    """Training was stopped by a signal; what was saved and how to resume is in the message."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
