"""The one exception type for errors a user can cause (bad paths, bad inputs, bad checkpoints).

Internal invariants use `assert`; anything a user can fix raises `PerceptionDLMError` with a message that
says what went wrong and what to do about it.
"""


class PerceptionDLMError(Exception):
    """An error caused by the user's input, files or configuration; the message says how to fix it."""
