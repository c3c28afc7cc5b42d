"""Test order of the default scenario: the monitoring tests run last, because they stop the
database writer and send images of their own, after test_pipeline has checked its exact counts."""


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.module.__name__ == "test_monitoring")
