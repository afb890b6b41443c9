"""The error every input check raises: one line naming the file, key or value at fault."""


class InputError(ValueError):
    """Bad user input: a missing file, an unknown config key, a corrupt image."""
