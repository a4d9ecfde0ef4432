"""The one base class of the mistakes a user can fix (a bad path, config key, record or option).

`dimoe …` prints such an error as one line and exits 2; anything else is a bug and keeps its
traceback. Each concern subclasses it (`ConfigError`, `NormalizeError`, `InputError`, …), so a
caller can catch one family or all of them.
"""


class UserError(ValueError):
    """A mistake in what the user gave: the message names what is wrong and how to fix it."""
