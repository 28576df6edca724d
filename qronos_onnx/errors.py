"""The exception type for problems a user can fix, and the warnings about a recipe and its data."""


class QronosError(Exception):
    """Bad input or an unsupported model: the message says what is wrong and what to do.

    The CLI prints it as one line, without a traceback, and exits non-zero.
    """


class CalibrationWarning(UserWarning):
    """The calibration (or evaluation) windows do not suit the model: too few tokens for a
    well-posed solve, or longer than the context it was trained for (the message says what to
    change)."""


class RecipeWarning(UserWarning):
    """A recipe option had no effect on this model (for example a pattern that matches no layer)."""


class RotationWarning(UserWarning):
    """A rotation the recipe asks for does not apply to this model (the message says which
    and why); the others are applied."""
