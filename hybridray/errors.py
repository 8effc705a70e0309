"""User-facing errors: reported in one line by the CLI, exit code 2, no traceback."""


class UserError(Exception):
    """A user mistake (bad config value, missing file, malformed data): exit code 2."""
