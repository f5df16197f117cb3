"""Convert a raw retrieval dataset into WebDataset shards with manifests: ``python tools/make_shards.py --help``.

The converter is ``dsmoe.shards`` (``python -m dsmoe.shards``, or the ``dsmoe-shards`` command of an installed
package); this script runs it from a checkout. Exit status: 0 on success, 1 when --verify finds problems, 2 on a
user error or a failed write, 130 when interrupted.
"""
import sys

import checkout  # noqa: F401  (dsmoe importable from a checkout)

from dsmoe.shards.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
