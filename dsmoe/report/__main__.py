"""``python -m dsmoe.report RUN [RUN ...] [--out DIR]``."""
import sys

from dsmoe.report import main

sys.exit(main())
