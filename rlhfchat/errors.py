"""The one exception type a user sees.

Anything that is the user's input being wrong (a missing file, a bad row, an unknown recipe key, a wrong base model
for a delta) raises `RlhfchatError` with a one-line message that names the file, line or field and what was
expected. The CLI prints it as `error: <message>` and exits with status 2; it never shows a traceback for these.
"""


class RlhfchatError(Exception):
    """A user-facing error with a one-line message."""
