import pytest

from iot_pipeline import db_consumer, inference_consumer, simulator
from iot_pipeline.config import ConfigError

BASE = {"IOT_KAFKA_BOOTSTRAP_SERVERS": "k1:9092, k2:9092"}


def test_settings_come_from_the_environment_with_defaults():
    settings = inference_consumer.load_settings([], {**BASE, "IOT_INFER_BATCH_SIZE": "16"})
    assert settings.kafka.bootstrap_servers == ("k1:9092", "k2:9092")
    assert settings.batch_size == 16
    assert settings.kafka.images_topic == "iot-images"
    assert settings.expected_image_size == (32, 32)


def test_a_flag_wins_over_the_environment():
    settings = simulator.load_settings(["--rate", "2.5", "--count", "7"],
                                       {**BASE, "IOT_SIM_RATE": "100"})
    assert (settings.rate, settings.count) == (2.5, 7)


def test_the_simulator_producer_linger_is_a_setting():
    assert simulator.load_settings([], BASE).linger_ms == 5
    assert simulator.load_settings([], {**BASE, "IOT_SIM_LINGER_MS": "25"}).linger_ms == 25
    with pytest.raises(ConfigError, match="IOT_SIM_LINGER_MS"):
        simulator.load_settings([], {**BASE, "IOT_SIM_LINGER_MS": "-1"})


def test_a_missing_required_setting_names_its_variable():
    with pytest.raises(ConfigError, match="IOT_KAFKA_BOOTSTRAP_SERVERS is required"):
        db_consumer.load_settings([], {})


@pytest.mark.parametrize(("env", "match"), [
    ({"IOT_DB_BATCH_SIZE": "0"}, "IOT_DB_BATCH_SIZE='0'"),
    ({"IOT_DB_BATCH_SIZE": "many"}, "IOT_DB_BATCH_SIZE='many'"),
    ({"IOT_EXPECTED_IMAGE_SIZE": "32"}, "IOT_EXPECTED_IMAGE_SIZE"),
    ({"IOT_KAFKA_SECURITY_PROTOCOL": "TLS"}, "IOT_KAFKA_SECURITY_PROTOCOL"),
    ({"IOT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "IOT_KAFKA_SASL_MECHANISM"),
    ({"IOT_LOG_LEVEL": "LOUD"}, "IOT_LOG_LEVEL"),
])
def test_bad_values_fail_fast_naming_the_variable(env, match):
    with pytest.raises(ConfigError, match=match):
        db_consumer.load_settings([], {**BASE, **env})


def test_migrate_only_does_not_need_kafka():
    _settings, migrate_only = db_consumer.load_settings(["--migrate-only"], {})
    assert migrate_only


def test_same_topic_for_images_and_results_is_allowed():
    settings = db_consumer.load_settings(
        [], {**BASE, "IOT_IMAGES_TOPIC": "iot", "IOT_RESULTS_TOPIC": "iot"})[0]
    assert settings.kafka.images_topic == settings.kafka.results_topic == "iot"


def test_the_sasl_password_is_not_in_the_settings_repr():
    settings = db_consumer.load_settings([], {
        **BASE, "IOT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "IOT_KAFKA_SASL_MECHANISM":
        "SCRAM-SHA-512", "IOT_KAFKA_SASL_USERNAME": "u", "IOT_KAFKA_SASL_PASSWORD": "s3cret"})[0]
    assert "s3cret" not in repr(settings)
    assert settings.kafka.client_config()["sasl_plain_password"] == "s3cret"


def test_consumer_group_settings_come_from_the_environment():
    settings = inference_consumer.load_settings([], {
        **BASE, "IOT_KAFKA_GROUP_INSTANCE_ID": "ml-1-iot-inference-consumer",
        "IOT_KAFKA_SESSION_TIMEOUT_MS": "12000", "IOT_MAX_ATTEMPTS": "5"})
    assert (settings.group_instance_id, settings.session_timeout_ms, settings.max_attempts) == (
        "ml-1-iot-inference-consumer", 12000, 5)
    defaults = db_consumer.load_settings([], BASE)[0]
    assert (defaults.group_instance_id, defaults.session_timeout_ms, defaults.max_attempts) == (
        None, 10000, 3)
    with pytest.raises(ConfigError, match="IOT_MAX_ATTEMPTS"):
        db_consumer.load_settings([], {**BASE, "IOT_MAX_ATTEMPTS": "0"})
