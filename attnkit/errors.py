"""The one base class of mistakes a user can fix (a recipe, a path, data, a setting).

Every such error names the fix in its message. The command line prints it as plain text and exits
with status 2; any other exception is a bug in attnkit, shown as one line (its traceback with
``attnkit --debug``).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""
