"""The one exception type for problems a user can cause and fix.

The CLI prints the message of a ``RetroRayError`` alone and exits non-zero; anything else is a bug
and keeps its traceback. A message names the problem and the fix.
"""


class RetroRayError(Exception):
    """A problem with the user's input, configuration or project directory."""
