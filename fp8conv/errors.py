"""Errors that the CLI maps to exit codes (one place prints them: fp8conv.cli)."""


class Fp8convError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserError(Fp8convError):
    """Bad input: a file, tensor, option or recipe the user can fix. Exit code 2.

    The message must name the offending file or tensor.
    """

    exit_code = 2


class RegressionError(Fp8convError):
    """``fp8conv verify`` found that the candidate changed what the model recommends. Exit code 1."""

    exit_code = 1
