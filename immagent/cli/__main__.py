"""``python -m immagent.cli``: the same as the ``immagent`` console script."""

import sys

from immagent.cli.app import main

sys.exit(main())
