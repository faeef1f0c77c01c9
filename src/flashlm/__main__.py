"""`python -m flashlm`: the `flashlm` command."""

import sys

from flashlm.cli import main

sys.exit(main())
