"""Project error types. The CLI turns any of them into one line on stderr and exit code 2."""


class EffitrainError(Exception):
    """A problem the user can act on (bad config, missing file, unsupported setting)."""


class ConfigError(EffitrainError):
    """The composed configuration is invalid: wrong type, unknown key or value out of range."""


class DataError(EffitrainError):
    """A dataset could not be found or read."""


class TrainingError(EffitrainError):
    """Training cannot continue (for example the loss became NaN in fp32)."""
