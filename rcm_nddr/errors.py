"""The base class of errors caused by bad input (a config, a data or store file, an argument): the
commands report them in one line, without a traceback."""


class UserError(Exception):
    """Bad input, described in the message: what is wrong, where (file, key or option) and what was expected."""


class ConfigError(UserError, ValueError):
    """A config that does not match the schema; the message names the file and the dotted key."""
