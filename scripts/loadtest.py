#!/usr/bin/env python3
"""Load a wstally server, measure it, and check that no update was lost or counted twice.

    python scripts/loadtest.py --spawn --watchers 1000 --senders 10 --duration 10

The logic lives in ``wstally.loadgen``; see docs/benchmarks.md for the figures it produced.
"""

import sys

from wstally.loadgen.run import main

if __name__ == "__main__":
    sys.exit(main())
