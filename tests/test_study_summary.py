"""`benchmarks/dinov2_study.py --summary`: the means over seeds that the recipe decision in
docs/data-and-recipes.md quotes, read back from the table the study appends to."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

ROWS = """| set | variant | seed | k-NN % | random init % | linear % | H/lnK end | proto end | uniform until step | warnings | wall min |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| demo | koleo | 0 | 89.0 | 43.3 | 84.8 | 0.58 | 25 | 140 | - | 13.1 |
| demo | koleo | 1 | 70.0 | 43.3 | 80.0 | 0.50 | 20 | 100 | - | 13.0 |
| demo | koleo | 1 | 86.0 | 40.8 | 82.2 | 0.60 | 30 | 100 | - | 13.0 |
| demo | koleo | 2 | exit 1 | | | | | | | | 2.0 |
| demo | dino | 0 | 81.3 | 43.3 | 80.1 | 0.71 | 17 | 0 | uniform_collapse | 13.0 |
"""


def test_summary_averages_each_recipe_over_its_seeds_once_each(tmp_path):
    (tmp_path / "table.md").write_text(ROWS)
    result = subprocess.run([sys.executable, "benchmarks/dinov2_study.py", "--summary",
                             "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: line
            for line in result.stdout.splitlines()[2:]}
    # seed 1's rerun replaces its first row; the failed seed 2 is left out
    assert rows[("demo", "koleo")] == ("| demo | koleo | 0,1 | 87.5 (86.0-89.0) | "
                                       "83.5 (82.2-84.8) | 28 | 0 of 2 |")
    assert rows[("demo", "dino")].endswith("| 17 | 1 of 1 |")
    assert not (tmp_path / "demo_koleo_seed0").exists()  # --summary runs nothing
