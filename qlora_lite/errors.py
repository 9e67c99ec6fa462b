"""The one exception type for mistakes a user can fix (bad path, bad data, impossible fit, bad token).

The CLI turns it into one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input. The message names the place (file, line, field) and the fix."""
