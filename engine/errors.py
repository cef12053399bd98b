"""The engine's user-facing errors: shown as one line by the command line, not as a traceback (exit status 2
for a usage error, 1 for a run that cannot go on)."""


class UsageError(ValueError):
    """A problem with what the user asked for (config, data, model path)."""


class ConfigError(UsageError):
    """An invalid configuration; the message names the key."""


class RunError(RuntimeError):
    """A run that cannot go on (it diverged); shown as one line (exit status 1) by the command line."""
