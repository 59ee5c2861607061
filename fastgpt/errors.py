"""One exception type for bad user input.

The CLI catches `FastGPTError` and prints its message as a single line with a
non-zero exit code, so users see *what* was wrong (file, key, shape, argument)
instead of a traceback. Library callers get an ordinary exception.
"""


class FastGPTError(Exception):
    """Bad input the user can fix: the message names the file, key or argument."""
