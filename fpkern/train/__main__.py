"""python -m fpkern.train: see fpkern.train.cli."""

import sys

from fpkern.train.cli import main

sys.exit(main())
