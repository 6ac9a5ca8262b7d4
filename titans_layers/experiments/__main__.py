"""``python -m titans_layers.experiments TASK [options]``: see :mod:`titans_layers.experiments.cli`."""

import sys

from titans_layers.experiments.cli import main

sys.exit(main())
