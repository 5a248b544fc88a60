"""The command line every stage shares: `--recipe FILE`, `--force`, then `key.path=value` overrides."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, Recipe, load_recipe

DEFAULT_RECIPE = "stages/recipes/demo.yaml"


def parse(description: str, argv: list[str] | None = None) -> tuple[Recipe, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe YAML (default: the embedded demo)")
    parser.add_argument("--force", action="store_true", help="re-run even if the artifact is up to date")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    args = parser.parse_args(argv)
    try:
        return load_recipe(args.recipe, args.overrides), args
    except ConfigError as e:
        sys.exit(f"error: {e}")
