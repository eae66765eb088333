"""The one exception type for errors a user can cause and fix."""


class TransformerError(Exception):
    """A user error: bad path, bad data, bad config, bad checkpoint.

    The message says what is wrong, where (file and line, or config field), and how to fix it.
    The CLI prints it without a traceback (unless ``--debug``) and exits with status 2.
    """
