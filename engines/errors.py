"""The one exception type for errors a user can fix (bad input, missing or tampered files).

The CLI prints its message as one line and exits 2; anything else is a bug and
keeps its traceback. Defined at the bottom layer so every package can raise it.
"""


class AdpdmError(Exception):
    """An error with a message that tells the user what is wrong and what to do."""
