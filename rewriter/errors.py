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
