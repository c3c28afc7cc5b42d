"""The vms scenario reuses the default scenario's helpers and the tls scenario's checks (linked
test_tls.py): one definition of each, read by every scenario that needs it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "default" / "tests"))


def pytest_collection_modifyitems(items):
    # The dry run first, before the other modules touch the deployment.
    items.sort(key=lambda item: item.module.__name__ != "test_vms_check_mode")
