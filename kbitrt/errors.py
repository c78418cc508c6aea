"""The errors kbitrt raises for expected failures: the CLI prints their one-line message, no traceback."""


class KbitError(ValueError):
    """A request kbitrt cannot serve; the message is one line that says what to do."""


class KbitFormatError(KbitError):
    """A kbit model (or a request to make one) is not valid; the message says what to do."""


class RunError(KbitError):
    """A request the runtime cannot serve (device, backend, prompt length); one clear line."""
