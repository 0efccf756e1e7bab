"""The README states no verdict the committed claims table does not: its claims section is the
table `posttrain report` wrote into results/mini/tables.md, verbatim, and no other line of the README
calls a claim reproduced, contradicted or inconclusive."""

import re

from tests.helpers import REPO

VERDICT_WORDS = re.compile(r"\b(reproduced|reproduces|reproduce in direction|contradicted|contradicts|inconclusive)\b", re.I)
BEGIN, END = "<!-- claims table: results/mini/tables.md, verbatim -->", "<!-- end of claims table -->"


def _claims_section(tables: str) -> str:
    start = tables.index("### Claims of the papers")
    end = tables.index("### Compute per run", start)
    return tables[start:end].strip()


def test_the_readme_claims_are_the_committed_table_and_nothing_else():
    readme = (REPO / "README.md").read_text()
    tables = (REPO / "results" / "mini" / "tables.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    before, rest = readme.split(BEGIN)
    block, after = rest.split(END)
    assert block.strip() == _claims_section(tables)
    for number, line in enumerate((before + after).splitlines(), start=1):
        assert not VERDICT_WORDS.search(line), f"README states a verdict outside the claims table: {line!r}"
