"""One base class for every error a user can act on; the CLI prints such an error as one line."""


class PneumoniaKfpError(Exception):
    """Something the user can fix; the message names the file, parameter or service and what to do."""


class UsageError(PneumoniaKfpError, ValueError):
    """A parameter is wrong."""


class DataError(PneumoniaKfpError, ValueError):
    """The dataset is missing or malformed."""
