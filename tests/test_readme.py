"""The README documents what the code does: its parameter table and its two commands."""

from pathlib import Path

from mlxserve.api.schemas import params_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_parameter_table_matches_the_schema():
    start = README.index("<!-- param-table:start -->") + len("<!-- param-table:start -->")
    end = README.index("<!-- param-table:end -->")
    assert README[start:end].strip() == params_markdown()


def test_ci_runs_the_readme_test_command():
    assert "./scripts/test.sh" in README
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
