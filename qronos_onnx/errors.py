"""The one exception type for problems a user can fix."""


class QronosError(Exception):
    """Bad input or an unsupported model: the message says what is wrong and what to do.

    The CLI prints it as one line, without a traceback, and exits non-zero.
    """
