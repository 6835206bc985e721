"""``python -m kinetic.cli ...`` (how torchrun starts kinetic): the ``kinetic`` command."""

import sys

from kinetic.cli import main

sys.exit(main())
