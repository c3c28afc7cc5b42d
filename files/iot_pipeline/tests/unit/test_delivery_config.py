import pytest

from iot_pipeline import inference_consumer
from iot_pipeline.config import ConfigError

BASE = {"IOT_KAFKA_BOOTSTRAP_SERVERS": "k:9092"}


def test_exactly_once_is_the_default_delivery():
    settings = inference_consumer.load_settings([], BASE)
    assert (settings.delivery, settings.transactional_id) == ("exactly_once", None)


def test_delivery_and_transactional_id_come_from_the_environment():
    settings = inference_consumer.load_settings([], {
        **BASE, "IOT_INFER_DELIVERY": "at_least_once",
        "IOT_INFER_TRANSACTIONAL_ID": "ml-1-iot-inference-consumer"})
    assert (settings.delivery, settings.transactional_id) == (
        "at_least_once", "ml-1-iot-inference-consumer")


def test_an_unknown_delivery_mode_is_refused():
    with pytest.raises(ConfigError, match="IOT_INFER_DELIVERY"):
        inference_consumer.load_settings([], {**BASE, "IOT_INFER_DELIVERY": "exactly-twice"})
