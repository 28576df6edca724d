"""The exception type for problems a user can fix, and the warning for weak calibration data."""


class QronosError(Exception):
    """Bad input or an unsupported model: the message says what is wrong and what to do.

    The CLI prints it as one line, without a traceback, and exits non-zero.
    """


class CalibrationWarning(UserWarning):
    """The calibration data is too small for a well-posed solve (the message says how much more)."""
