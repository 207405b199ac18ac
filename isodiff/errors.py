"""The errors a user can fix, in a module that imports nothing: every command reports them
in one line and exit 2, before anything heavy loads."""


class UserError(Exception):
    """An error the user can fix: entry points print its message alone and exit 2."""


class ConfigError(UserError, ValueError):
    """A bad config value or input: the message names the key and the fix."""
