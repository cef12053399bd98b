"""The engine's user-facing errors: shown as one line (exit status 2) by the command line, not as a traceback."""


class UsageError(ValueError):
    """A problem with what the user asked for (config, data, model path)."""


class ConfigError(UsageError):
    """An invalid configuration; the message names the key."""
