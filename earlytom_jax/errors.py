"""User-facing errors: each carries one line that says what was wrong and what to do."""


class EarlyTomError(Exception):
    """Base class; the command line prints `str(e)` on one line and exits non-zero."""


class CheckpointError(EarlyTomError):
    """A checkpoint directory is missing, incomplete, or does not match its config."""


class ConfigError(EarlyTomError):
    """A setting is outside its valid range."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
