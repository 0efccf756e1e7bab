"""Every shipped recipe validates against its schema and documents itself."""

import re
from pathlib import Path

import pytest

from posttrain.config import RLRecipe, EvalRecipe, TrainRecipe, load_recipe, parse_yaml
from posttrain.recipes import description
from tests.helpers import REPO, run_cli

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def schema_of(path: Path):
    raw = parse_yaml(path.read_text(), str(path))
    if "benchmarks" in raw:
        return EvalRecipe
    return RLRecipe if "student" in raw else TrainRecipe


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_recipe_validates_and_has_a_header(path):
    recipe = load_recipe(path, schema_of(path))
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert description(path), "the first comment line is the recipe's one-line description"
    assert any("posttrain " in line or "posttrain.cli " in line for line in header), "the header gives the command"
    if "paper" in path.parts:
        text = "\n".join(header)
        assert "Hardware:" in text and "Source:" in text, "paper recipes state hardware, source table and numbers"
    if schema_of(path) is not EvalRecipe:
        assert recipe.name


def test_the_makefile_runs_every_mini_variant():
    makefile = (REPO / "Makefile").read_text()
    listed = set(re.search(r"^OFFLINE := (.*)$", makefile, re.M).group(1).split())
    for variable in ("ONLINE", "RL", "RFT", "PREF"):
        listed |= set(re.search(rf"^{variable} := (.*)$", makefile, re.M).group(1).split())
    shipped = {p.stem for p in (REPO / "recipes" / "mini").glob("*.yaml")} - {"base", "teacher"}
    assert listed == shipped


def test_recipes_command_lists_them():
    proc = run_cli("recipes")
    assert "mini/lsm.yaml" in proc.stderr and "paper/dft-qwen2.5-math-1.5b.yaml" in proc.stderr
