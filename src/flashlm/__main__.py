import sys

from flashlm.cli import main

sys.exit(main())
