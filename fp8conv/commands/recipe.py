"""`fp8conv recipe list` and `fp8conv recipe show [NAME|FILE]`: the quantization recipes."""

from __future__ import annotations

import click


@click.group("recipe")
def recipe() -> None:
    """Show the built-in quantization recipes (docs/recipes.md)."""


@recipe.command("list")
def list_cmd() -> None:
    """List the built-in recipes."""
    from fp8conv.recipe import BUILTIN_DEFAULT, builtin_names, load_recipe

    for name in builtin_names():
        r = load_recipe(name)
        mark = " (default)" if name == BUILTIN_DEFAULT else ""
        click.echo(f"{name}{mark}: {r.description}")


@recipe.command("show")
@click.argument("name", required=False)
def show(name: str | None) -> None:
    """Print a recipe's TOML: a built-in NAME (default onerec_v2) or a FILE, checked first."""
    from fp8conv.recipe import load_recipe

    r = load_recipe(name)
    click.echo(r.text or r.to_toml(), nl=False)
