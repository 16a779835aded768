"""Print the README's request-parameter table, generated from mlxserve.api.schemas.PARAMS.

    .venv/bin/python scripts/param_table.py    # paste between the README's param-table markers
"""

from mlxserve.api.schemas import params_markdown

print(params_markdown())
