"""``python -m dsmoe.shards``: convert a raw dataset layout into WebDataset shards (see ``dsmoe.shards.cli``)."""
import sys

from dsmoe.shards.cli import main

if __name__ == "__main__":
    sys.exit(main())
