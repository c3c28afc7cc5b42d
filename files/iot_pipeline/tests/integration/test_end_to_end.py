"""The whole pipeline as real processes: gunicorn ML server (the repo's CIFAR-100 ResNet-50),
inference consumer, DB consumer and simulator, on a real broker and a real PostgreSQL."""

import dataclasses
import json
import logging
import time
import urllib.request
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iot_pipeline import messages

from harness import (
    BIN,
    CIFAR_DIR,
    MODEL_CARD,
    Process,
    count,
    headers,
    image_message,
    produce,
    read_all,
    rows,
    service_env,
    start_ml_server,
    wait_for,
)
from servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
log = logging.getLogger(__name__)


@contextmanager
def running_pipeline(kafka_bootstrap, kafka_topics, pg_dsn, tmp_path):
    """ML server + both consumers running; yields the environment the simulator needs."""
    port = free_port()
    env = service_env(kafka_bootstrap, kafka_topics,
                      IOT_ML_SERVER_URL=f"http://127.0.0.1:{port}", IOT_DB_DSN=pg_dsn,
                      IOT_INFER_GROUP_ID=f"infer-{kafka_topics.images}",
                      IOT_DB_GROUP_ID=f"db-{kafka_topics.images}",
                      # Below the broker's 1 MB message limit, so an oversized image can be sent.
                      IOT_MAX_IMAGE_BYTES=str(256 * 1024))
    assert CIFAR_DIR.is_dir(), f"real CIFAR-100 expected at {CIFAR_DIR} (set IOT_TEST_CIFAR_DIR)"
    processes = [start_ml_server(port, tmp_path, env)]
    try:
        for name in ("inference-consumer", "db-consumer"):
            metrics_port = free_port()
            processes.append(Process(name, [str(BIN / name)],
                                     {**env, "IOT_METRICS_PORT": str(metrics_port)}, tmp_path))
            processes[-1].metrics_port = metrics_port
        yield env, processes
        for process in processes:
            process.assert_running()
    finally:
        codes = {p.name: p.stop() for p in reversed(processes)}
    # SIGTERM finishes the batch, commits and exits 0.
    assert codes == {p.name: 0 for p in processes}, "\n".join(p.log() for p in processes)


@pytest.fixture
def pipeline(kafka_bootstrap, kafka_topics, pg_dsn, tmp_path):
    with running_pipeline(kafka_bootstrap, kafka_topics, pg_dsn, tmp_path) as running:
        yield running


def simulate(env, tmp_path, count_, **extra):
    ack_log = tmp_path / "acked.txt"
    simulator = Process("simulator", [str(BIN / "iot-simulator")], {
        **env, "IOT_SIM_DATASET": str(CIFAR_DIR), "IOT_SIM_COUNT": str(count_),
        "IOT_SIM_RATE": "0", "IOT_SIM_DEVICES": "25", "IOT_SIM_ACK_LOG": str(ack_log),
        "IOT_SIM_CACHE_DIR": str(tmp_path / "cache"), **extra,
    }, tmp_path)
    assert simulator.wait(120) == 0, simulator.log()
    simulator.stop()
    return ack_log.read_text().split()


def scrape(process) -> dict[tuple[str, tuple], float]:
    """The service's /metrics, as a real Prometheus would read it: {(name, labels): value}."""
    url = f"http://127.0.0.1:{process.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_complete(dsn, expected, processes, timeout=600):
    def done():
        for process in processes:
            process.assert_running()
        return count(dsn, "inferred_value IS NOT NULL AND data IS NOT NULL") >= expected

    wait_for(done, timeout, f"{expected} complete rows", interval=1)


def test_300_real_images_end_in_300_complete_rows(pipeline, pg_dsn, kafka_bootstrap,
                                                   kafka_topics, tmp_path):
    env, processes = pipeline
    started = time.monotonic()
    acked = simulate(env, tmp_path, 300)
    assert len(acked) == len(set(acked)) == 300
    wait_complete(pg_dsn, 300, processes)
    elapsed = time.monotonic() - started
    stored = rows(pg_dsn)
    assert len(stored) == 300
    assert {r[0] for r in stored} == set(acked)
    labels, agreeing = set(), 0
    card = json.loads(MODEL_CARD.read_text())
    for _unique_id, ground_truth, inferred_value, data, device_id in stored:
        assert ground_truth
        assert inferred_value in card["labels"]
        assert device_id.startswith("device-")
        assert messages.decode_image(bytes(data)).shape == (32, 32, 3)
        labels.add(ground_truth)
        agreeing += inferred_value == ground_truth
    assert len(labels) > 50, "the simulator should send a shuffled mix of the 100 classes"
    # Through PNG, base64, Kafka and HTTP the predictions are the model's: top-1 near the card's
    # (300 images: +-6 points at 2 sigma); random weights would agree on ~1 %.
    assert agreeing / 300 >= card["test_top1"] - 0.15, (agreeing, card["test_top1"])
    assert read_all(kafka_bootstrap, kafka_topics.dlq) == []
    # Each service's endpoint counted the same 300 (exactly once: results commit once).
    inference, db = (p for p in processes if p.name in ("inference-consumer", "db-consumer"))
    wait_for(lambda: scrape(db).get(("iot_e2e_latency_seconds_count", ())) == 300, 30,
             "300 end-to-end latencies")
    db_metrics, inference_metrics = scrape(db), scrape(inference)
    assert db_metrics[("iot_db_rows_written_total", (("kind", "result"),))] >= 300
    assert db_metrics[("iot_db_rows_written_total", (("kind", "image"),))] >= 300
    assert 0 < db_metrics[("iot_e2e_latency_seconds_sum", ())] / 300 < elapsed
    assert inference_metrics[("iot_inference_results_published_total", ())] == 300
    assert inference_metrics[("iot_inference_records_consumed_total", ())] >= 300
    log.warning("end-to-end: 300 images in %.1fs (%.1f images/s)", elapsed, 300 / elapsed)


def poison_records():
    good = image_message("template")
    payload = good.to_bytes()
    return {
        "bad_json": b"{this is not json",
        "missing_field": payload.replace(b'"ground_truth"', b'"ground_trvth"'),
        "bad_base64": payload.replace(b'"image":"', b'"image":"!!', 1),
        "corrupt_image": messages.ImageMessage(
            "trunc", "device-0001", "apple", good.image_png[:-30], good.produced_at).to_bytes(),
        "wrong_image_size": messages.ImageMessage(
            "big", "device-0001", "apple", _png(64), good.produced_at).to_bytes(),
        "image_too_large": payload.replace(b'"image":"', b'"image":"' + b"A" * 600_000, 1),
        "empty_message": None,
    }


def _png(size):
    import numpy as np

    return messages.encode_png(np.zeros((size, size, 3), np.uint8))


def test_bad_messages_all_reach_the_dead_letter_topic_and_good_ones_are_stored(
        pipeline, pg_dsn, kafka_bootstrap, kafka_topics, tmp_path):
    env, processes = pipeline
    poison = poison_records()
    produce(kafka_bootstrap, kafka_topics.images, list(poison.values()))
    acked = simulate(env, tmp_path, 100)
    wait_complete(pg_dsn, 100, processes)
    groups = {env["IOT_INFER_GROUP_ID"], env["IOT_DB_GROUP_ID"]}
    wait_for(lambda: len(read_all(kafka_bootstrap, kafka_topics.dlq)) == 2 * len(poison), 60,
             "every poison record dead-lettered by both consumer groups")
    dead = read_all(kafka_bootstrap, kafka_topics.dlq)
    for group in groups:
        reasons = sorted(headers(r)["dlq.reason"] for r in dead if headers(r)["dlq.group"] == group)
        assert reasons == sorted(poison), group
    assert {r[0] for r in rows(pg_dsn)} == set(acked)


def test_one_topic_for_images_and_results_works_too(kafka_bootstrap, kafka_topics, pg_dsn,
                                                    tmp_path):
    single = dataclasses.replace(kafka_topics, results=kafka_topics.images)  # the original design
    with running_pipeline(kafka_bootstrap, single, pg_dsn, tmp_path) as (env, processes):
        acked = simulate(env, tmp_path, 50)
        wait_complete(pg_dsn, 50, processes)
    assert {r[0] for r in rows(pg_dsn)} == set(acked)
    assert read_all(kafka_bootstrap, kafka_topics.dlq) == []
