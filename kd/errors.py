"""The one exception a user sees as a message, not a traceback: raised by any layer, printed by the CLI."""


class StageError(Exception):
    """A problem with the user's inputs, phrased for them; the CLI prints it without a traceback."""
