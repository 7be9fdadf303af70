"""`python -m storydiff ...` is the `storydiff` command, for environments whose scripts folder is not on PATH."""

import sys

from storydiff.cli import main

sys.exit(main())
