"""Project error types, and the one helper that words every "not allowed" message.

The CLI turns any EffitrainError into one line on stderr and exit code 2.
"""

from __future__ import annotations

from typing import Any


class EffitrainError(Exception):
    """A problem the user can act on (bad config, missing file, unsupported setting)."""


class ConfigError(EffitrainError):
    """The composed configuration is invalid: wrong type, unknown key or value out of range."""


class DataError(EffitrainError):
    """A dataset could not be found or read."""


class TrainingError(EffitrainError):
    """Training cannot continue (for example the loss became NaN in fp32)."""


def not_allowed(key: str, value: Any, allowed: str) -> ConfigError:
    """The error for a value out of range: `KEY = VALUE is not allowed (allowed: ALLOWED)`.

    Args:
        key: the dotted config key (or the field name; stage builders add `stage.<name>.`).
        value: the offending value (shown with repr, so strings are quoted).
        allowed: what is allowed, in words.
    """
    return ConfigError(f"{key} = {value!r} is not allowed (allowed: {allowed})")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `not_allowed(key, value, allowed)` unless `ok`."""
    if not ok:
        raise not_allowed(key, value, allowed)


def require_choice(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    """Raise unless `value` is one of `choices` (listed in the message)."""
    require(value in choices, key, value, ", ".join(choices))


def instantiate_or_explain(node: Any, what: str, **kwargs: Any) -> Any:
    """Hydra's `instantiate(node, **kwargs)`, with what the target raises as one line:
    `WHAT: cannot build 'TARGET' (first line of the cause)`; an EffitrainError it raises passes
    through as it is (instantiate wraps it)."""
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except EffitrainError:
        raise
    except Exception as error:
        cause = error.__cause__ or error
        if isinstance(cause, EffitrainError):
            raise cause from None
        raise ConfigError(f"{what}: cannot build {node.get('_target_')!r} ({str(cause).splitlines()[0]})") from None
