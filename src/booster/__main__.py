"""``python -m booster`` runs the same command line as ``booster``."""

import sys

from booster.cli import main

sys.exit(main())
