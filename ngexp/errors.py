"""Errors a user can fix; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (config value, missing data set, bad path): message says what and how to fix."""


class IncompatibleData(UserError):
    """A model that cannot take the data set's examples (e.g. a CNN on token ids)."""

    def __init__(self, model: str, data: str, found: str, kinds: tuple[str, ...]) -> None:
        self.model, self.data, self.found, self.kinds = model, data, found, kinds
        super().__init__(f"{model} needs {' or '.join(kinds)} data, but data {data!r} has "
                         f"{found}")


class OptionError(UserError, ValueError):
    """An option value outside its valid range or choices (raised by ``ngexp.options.check``)."""
