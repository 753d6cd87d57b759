"""``python -m worker.cli``: the ``mmstream`` command."""

import sys

from worker.cli.main import main

sys.exit(main())
