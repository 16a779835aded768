"""The command line's commands, one module per group; `mlxserve.cli` parses and dispatches."""
