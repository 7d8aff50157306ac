"""The user-error type every command reports the same way.

A ``UserError`` is a mistake in what a command was given (a setting, a path, a file); its
message names the setting and the fix. The commands print it as one line, ``error: <message>``,
and exit with status 2 (``metakernels.cli.command``); every other exception is a bug and keeps
its traceback. This module imports nothing, so any library module can raise the type.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in a command's input; the message names the setting and the fix."""
