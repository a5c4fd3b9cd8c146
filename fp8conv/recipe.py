"""Quantization recipes: which tensor gets which scheme (docs/recipes.md).

A recipe is TOML: a name, a ``default`` ("error" or "keep") and ordered ``[[rules]]`` of
``pattern`` -> ``scheme`` ("channel", "block" or "keep"). For a tensor, the first rule whose pattern
matches its full name wins. Patterns are globs (``fnmatch``, where ``*`` also crosses dots) or, with a
``re:`` prefix, Python regexes that must match the WHOLE name (``re.fullmatch``: a regex that matches a
prefix only does not claim a tensor, so nothing is quantized by accident).

Only 2-D ``*.weight`` tensors are quantizable; every other tensor (1-D norms and biases, buffers,
3-D+ tensors) is always kept and rules are not consulted for it. A 2-D weight that no rule claims is an
error (listing every such tensor) unless ``default = "keep"``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fp8conv.errors import UserError
from fp8conv.tomlfile import parse_toml

SCHEMES = ("channel", "block", "keep")
DEFAULTS = ("error", "keep")
BUILTIN_DEFAULT = "onerec_v2"


def _recipes_dir():
    # recipes/ is package data of fp8conv (pyproject), not a package of its own
    return resources.files("fp8conv").joinpath("recipes")


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in _recipes_dir().iterdir()
                  if p.name.endswith(".toml"))


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: str

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return _regex(self.pattern[3:]).fullmatch(name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


def _regex(text: str) -> re.Pattern:
    return re.compile(text)  # re caches compiled patterns; validated in Recipe.__post_init__


@dataclass(frozen=True)
class Recipe:
    name: str
    default: str = "error"
    rules: tuple[Rule, ...] = ()
    description: str = ""
    source: str = "<recipe>"
    text: str = ""  # the TOML it was read from, comments included (the manifest keeps it)

    def __post_init__(self) -> None:
        where = f"{self.source}"
        if not isinstance(self.name, str) or not self.name:
            raise UserError(f"{where}: 'name' must be a non-empty string")
        if self.default not in DEFAULTS:
            raise UserError(f"{where}: default = {self.default!r}; expected one of {', '.join(DEFAULTS)}")
        for i, r in enumerate(self.rules):
            if r.scheme not in SCHEMES:
                raise UserError(f"{where}: rules[{i}] ({r.pattern!r}) has unknown scheme {r.scheme!r}; "
                                f"expected one of {', '.join(SCHEMES)}")
            if not isinstance(r.pattern, str) or not r.pattern or r.pattern == "re:":
                raise UserError(f"{where}: rules[{i}] has an empty pattern")
            if r.pattern.startswith("re:"):
                try:
                    _regex(r.pattern[3:])
                except re.error as e:
                    raise UserError(f"{where}: rules[{i}] pattern {r.pattern!r} is not a valid regex "
                                    f"({e})") from None

    # -- matching --------------------------------------------------------------------------------
    def scheme_for(self, name: str, shape: tuple[int, ...]) -> str:
        """"channel", "block" or "keep" for one tensor; UserError if no rule claims a 2-D weight."""
        if not is_quantizable(name, shape):
            return "keep"
        for r in self.rules:
            if r.matches(name):
                return r.scheme
        if self.default == "keep":
            return "keep"
        raise UserError(f"tensor {name!r} {list(shape)}: no rule of recipe {self.name!r} ({self.source}) "
                        f"claims it and its default is 'error'")

    def unclaimed(self, tensors: dict[str, tuple[int, ...]]) -> list[str]:
        """Every 2-D weight no rule claims (empty when default = "keep")."""
        if self.default == "keep":
            return []
        return [n for n, s in tensors.items()
                if is_quantizable(n, s) and not any(r.matches(n) for r in self.rules)]

    # -- TOML ------------------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, text: str, source: str = "<recipe>") -> "Recipe":
        obj = parse_toml(text, source)
        unknown = set(obj) - {"name", "default", "description", "rules"}
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; "
                            f"expected name, description, default, [[rules]]")
        rules = obj.get("rules", [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise UserError(f"{source}: 'rules' must be an array of tables ([[rules]])")
        parsed = []
        for i, r in enumerate(rules):
            if set(r) != {"pattern", "scheme"}:
                raise UserError(f"{source}: rules[{i}] must have exactly 'pattern' and 'scheme', "
                                f"got {sorted(r)}")
            if not isinstance(r["pattern"], str) or not isinstance(r["scheme"], str):
                raise UserError(f"{source}: rules[{i}] pattern and scheme must be strings")
            parsed.append(Rule(r["pattern"], r["scheme"]))
        for key in ("name", "default", "description"):
            if key in obj and not isinstance(obj[key], str):
                raise UserError(f"{source}: '{key}' must be a string")
        name = obj.get("name") or Path(source).stem
        return cls(name, obj.get("default", "error"), tuple(parsed), obj.get("description", ""), source, text)

    def to_toml(self) -> str:
        """Canonical TOML; ``from_toml(to_toml())`` gives an equal recipe (the manifest stores this)."""
        lines = [f"name = {_toml_str(self.name)}"]
        if self.description:
            lines.append(f"description = {_toml_str(self.description)}")
        lines.append(f"default = {_toml_str(self.default)}")
        for r in self.rules:
            lines += ["", "[[rules]]", f"pattern = {_toml_str(r.pattern)}", f"scheme = {_toml_str(r.scheme)}"]
        return "\n".join(lines) + "\n"

    def __eq__(self, other) -> bool:  # the source label is not part of what a recipe does
        return isinstance(other, Recipe) and (self.name, self.default, self.rules) == \
            (other.name, other.default, other.rules)

    def __hash__(self) -> int:
        return hash((self.name, self.default, self.rules))


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2


def _toml_str(s: str) -> str:
    # A literal string keeps regex backslashes readable; fall back to an escaped basic string.
    if "'" not in s and "\n" not in s and all(c >= " " or c == "\t" for c in s):
        return f"'{s}'"
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    out = "".join(c if c >= " " else f"\\u{ord(c):04x}" for c in out)
    return f'"{out}"'


def builtin_text(name: str) -> str:
    if name not in builtin_names():
        raise UserError(f"unknown built-in recipe {name!r}; built-ins: {', '.join(builtin_names())}")
    return _recipes_dir().joinpath(f"{name}.toml").read_text()


def load_recipe(path_or_name: str | Path | None = None) -> Recipe:
    """None -> the built-in "onerec_v2"; a built-in name; or a TOML file path."""
    if path_or_name is None:
        path_or_name = BUILTIN_DEFAULT
    text_name = str(path_or_name)
    if not isinstance(path_or_name, Path) and text_name in builtin_names():
        return Recipe.from_toml(builtin_text(text_name), source=f"built-in recipe {text_name}")
    path = Path(path_or_name)
    if not path.exists() or path.is_dir():  # a pipe is fine: --recipe <(fp8conv recipe show | sed ...)
        raise UserError(f"recipe {text_name!r}: neither a built-in ({', '.join(builtin_names())}) "
                        f"nor a file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read recipe ({e})") from None
    return Recipe.from_toml(text, source=str(path))
