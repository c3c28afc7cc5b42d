"""End to end in ZooKeeper mode: the default scenario's checks on this scenario's four hosts.
The 200 images the simulator sent on deploy are all stored with a prediction, none went to the
dead-letter topic, and playbooks/simulate.yml sends 50 more that arrive as well."""

from test_pipeline import (  # noqa: F401 (collected by pytest from here)
    test_dead_letter_topic_empty,
    test_first_run_arrives_complete,
    test_simulate_more_images,
)

testinfra_hosts = ["ansible://database"]
