"""Tools run from a checkout without installing dsmoe: importing this module makes the checkout's ``dsmoe``
importable (an installed one is used as it is)."""
import sys
from pathlib import Path

try:
    import dsmoe  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
