"""The exception type for problems a user can fix, and the warnings about a recipe and its data."""


class QronosError(Exception):
    """Bad input or an unsupported model: the message says what is wrong and what to do.

    The CLI prints it as one line, without a traceback, and exits non-zero.
    """


class CalibrationWarning(UserWarning):
    """The calibration data is too small for a well-posed solve (the message says how much more)."""


class RecipeWarning(UserWarning):
    """A recipe option had no effect on this model (for example a pattern that matches no layer)."""
