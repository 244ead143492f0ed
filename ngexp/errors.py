"""Errors a user can fix; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (config value, missing data set, bad path): message says what and how to fix."""


class OptionError(UserError, ValueError):
    """An option value outside its valid range or choices (raised by ``ngexp.options.check``)."""
