"""The one exception type users see: a clear, single-line message about their input."""


class SaftError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits non-zero."""
