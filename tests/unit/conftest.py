"""Unit tests run on plain tensors: make the repo root importable (``import cache_core...``)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
