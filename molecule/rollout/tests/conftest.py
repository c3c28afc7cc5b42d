"""Lets this scenario's tests import the default scenario's helpers and end-to-end checks."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "default" / "tests"))
