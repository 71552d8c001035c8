"""The tooling ring: the bench, the docs, the demo, the toy world and the packaging metadata,
tested apart from the product's rings (unit, in-process, host, workflows)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
