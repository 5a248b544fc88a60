"""The command line every stage shares: `--recipe FILE`, `--force`, `--resume`, then `key.path=value`
overrides. How a stage's process starts and ends is pipeline/process.py."""

from __future__ import annotations

import argparse

from pipeline.recipe import Recipe
from pipeline.recipe_loader import load_recipe

DEFAULT_RECIPE = "stages/recipes/demo.yaml"


def parse(description: str, argv: list[str] | None = None) -> tuple[Recipe, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe YAML (default: the embedded demo)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-run even if the artifact is up to date (an "
        "interrupted run's checkpoints are moved aside, not deleted)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on from an interrupted run's checkpoint even "
        "though the recipe changed in a way that alters the run (make: RESUME=1)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)  # `--force` may stand between overrides
    return load_recipe(args.recipe, args.overrides), args
