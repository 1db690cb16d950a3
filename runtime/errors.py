"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class RexEdgeError(Exception):
    """Bad input or an unusable model: the message names the input and what was expected."""
