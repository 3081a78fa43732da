"""The command line: one module per `python -m helpers <command>` (argument parsing and printing only)."""
