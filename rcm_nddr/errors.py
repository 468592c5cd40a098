"""The base class of errors caused by bad input (a config, a data or store file, an argument): the
commands report them in one line, without a traceback."""


class UserError(Exception):
    """Bad input, described in the message: what is wrong, where (file, key or option) and what was expected."""
