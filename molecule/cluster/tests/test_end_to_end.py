"""End to end on three brokers: the default scenario's checks on this scenario's hosts. The 200
images the simulator sent on deploy are all stored with a prediction, none went to the dead-letter
topic (the stream under faults is test_faults.py)."""

from test_pipeline import (  # noqa: F401 (collected by pytest from here)
    test_dead_letter_topic_empty,
    test_first_run_arrives_complete,
)

testinfra_hosts = ["ansible://database"]
