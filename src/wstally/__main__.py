"""``python -m wstally`` runs the command line interface."""

import sys

from wstally.cli import main

sys.exit(main())
