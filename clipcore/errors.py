"""The one exception type a stage turns into a one-line message and a non-zero exit."""


class ClipcoreError(Exception):
    """A problem the user can fix: bad input, bad parameter, missing file, offline hub."""
