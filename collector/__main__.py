"""python -m collector: the waystation-collector command."""

import sys

from collector.cli import main

sys.exit(main())
