"""The one base class of errors a user can fix: a bad config value, missing data, a workdir.

`launch.py` turns every `UserError` into one line on stderr and exit status 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Something the user asked for cannot run; the message names what and how to fix it."""
