"""pipeline_app molecule fixture: stands in for a pipeline service under the shared unit template."""

import logging
import os
import signal
import sys
import time

log = logging.getLogger("pipeline_fixture")


def main() -> int:
    """Log the settings the unit passed in, then sleep until SIGTERM."""
    logging.basicConfig(level=os.environ.get("IOT_LOG_LEVEL", "INFO"))
    stop = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    log.info("bootstrap=%s greeting=%s", os.environ.get("IOT_KAFKA_BOOTSTRAP_SERVERS"),
             os.environ.get("FIXTURE_GREETING"))
    # Prove the sandbox leaves the state dir writable (ReadWritePaths) and everything else read-only.
    state = os.environ["HOME"]
    with open(os.path.join(state, "fixture.alive"), "w", encoding="utf-8") as fh:
        fh.write(str(os.getpid()))
    while not stop:
        time.sleep(0.5)
    log.info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
