"""``python -m benchmarks <subcommand>``: see ``benchmarks/__init__.py``."""

from benchmarks import main

main()
