"""User-facing errors: each carries one line naming the file or field and what was expected."""


class RshashError(Exception):
    """An error caused by the user's input; the CLI prints it on one line and exits non-zero."""


class DataError(RshashError):
    """A dataset, split or feature file is missing, malformed or does not fit the request."""
