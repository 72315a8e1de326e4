"""The one exception type for bad user input: the CLI prints it as one line, the service as a 4xx."""


class UserError(Exception):
    """Something the user asked for or supplied is wrong; the message says what and what is allowed."""


class TooLarge(UserError):
    """Input over a configured size limit (the service answers HTTP 413)."""
