"""``python -m pya2a {bench,tune,info}``."""

import sys

from .cli import main

sys.exit(main())
