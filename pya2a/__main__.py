"""``python -m pya2a {bench,tune,info}``."""

import sys

from .tools.cli import main

sys.exit(main())
