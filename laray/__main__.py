"""`python -m laray`: the same as the `laray` command."""

import sys

from laray.cli.main import main

sys.exit(main())
