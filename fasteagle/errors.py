class FastEagleError(Exception):
    """A problem with the user's input (checkpoint, prompt, parameters): the CLI prints it without a traceback."""
