class StageError(Exception):
    """A problem with the user's inputs, phrased for them; the CLI prints it without a traceback."""
