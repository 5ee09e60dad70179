"""`python -m loadsvc` is the `loadsvc` command."""

import sys

from loadsvc.cli import main

sys.exit(main())
