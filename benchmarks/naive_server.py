#!/usr/bin/env python3
"""The naive reference server; it lives in ``wstally.loadgen.naive_server``.

Kept here so that ``python benchmarks/naive_server.py`` still works from a checkout.
"""

import sys

from wstally.loadgen.naive_server import main

if __name__ == "__main__":
    sys.exit(main())
