"""Exceptions that carry the CLI's documented exit codes."""


class AttnRewriteError(Exception):
    """Runtime failure (exit 3)."""

    exit_code = 3


class InputError(AttnRewriteError):
    """Bad usage or bad input (exit 2); the message is one clear sentence."""

    exit_code = 2


class BudgetExceeded(AttnRewriteError):
    """An accuracy budget was not met (exit 1)."""

    exit_code = 1


class NoAttentionFound(AttnRewriteError):
    """The model has no attention site we can describe (exit 4)."""

    exit_code = 4


class PassError(AttnRewriteError):
    """A pass produced an invalid model or failed; names the passes that already ran (exit 3)."""


class PostconditionError(PassError):
    """A pass broke its own promise (`Pass.ensures`), e.g. an exact pass drifted (exit 3)."""


def ort_message(exc: BaseException) -> str:
    """The informative line of an onnxruntime exception (its last), capped for a one-sentence error."""
    lines = str(exc).strip().splitlines()
    return lines[-1][:300] if lines else type(exc).__name__
