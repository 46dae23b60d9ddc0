"""`python -m shammie ...` is the `shammie` command."""

import sys

from shammie.cli import main

sys.exit(main())
