"""``python -m metakernels.prepare``: split raw per-task files into support and query sets.

See ``metakernels.data.prepare`` for the options; ``--help`` lists them.
"""
import sys

from .data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
