"""Parsing user TOML (recipes, verify thresholds) with errors that name the file.

tomllib is in the standard library from Python 3.11; on 3.10 the `tomli` backport (a declared
dependency there) has the same API.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fp8conv.errors import UserError


def parse_toml(text: str, source: str) -> dict:
    """TOML text -> dict; UserError naming ``source`` for anything the parser rejects."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source}: not valid TOML ({e})") from None
    except RecursionError:  # x = [[[[...]]]] nested deeper than the parser recurses
        raise UserError(f"{source}: not valid TOML (nested too deeply)") from None
