"""User-facing errors: one line naming the problem and the fix; the CLI exits 2."""


class CocoError(Exception):
    """Bad input. The message is shown to the user as a single line."""

    exit_code = 2
