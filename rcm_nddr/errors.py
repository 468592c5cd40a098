"""The base class of errors caused by bad input (a config, a data or store file, an argument): the
commands report them in one line, without a traceback, and exit with status 2."""


class UserError(Exception):
    """Bad input, described in the message: what is wrong, where (file, key or option) and what was expected."""

    #: under torchrun, whether every process raises the same error (it follows from the config, the shared
    #: files and the number of processes alone): then rank 0 alone reports it
    same_on_every_rank = False


class ConfigError(UserError, ValueError):
    """A config that does not match the schema; the message names the file and the dotted key."""
