"""effitrain: config-driven experiment runner for efficient deep-learning training.

Importing the package is cheap on purpose (no torch): the CLI's help, `ls` and `show`
paths import only what they need.
"""

__version__ = "0.1.0"
