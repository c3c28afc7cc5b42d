"""The original design, small and faithful, for `make bench`'s P2 ratio (not a pipeline to deploy).

One image per step, as the design this repository started from had it:

    produce   (simulator host)  one Kafka produce per image, waiting for its ack
    classify  (ML host)         per image message: one HTTP request to `server`, one produce of
                                the result (ack waited)
    server    (ML host)         Flask under gunicorn, one worker: the PNG decoded, resized to
                                224x224 and one `model.predict` per request on the ImageNet-shaped
                                Keras ResNet-50 (random weights: the same FLOPs as ImageNet's)
    store     (database host)   per message of either topic: one UPSERT and one commit

bench/run.py copies this file to the hosts and runs each part there with the deployed venv and
the matching service's environment file (Kafka settings, TLS/SASL included, and the database
DSN), on topics and a table of its own (`iot-baseline-<run>-images` and `-results`, deleted by the
`cleanup` part, and `bench_baseline`), so the pipeline's data is not touched. Every part prints
one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime

log = logging.getLogger("baseline")
TABLE = "bench_baseline"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    unique_id text PRIMARY KEY,
    ground_truth text,
    data bytea,
    produced_at timestamptz,
    inferred_value text,
    image_stored_at timestamptz,
    result_stored_at timestamptz
)"""


def _kafka() -> dict:
    """kafka-python keyword arguments from the service's IOT_KAFKA_* environment."""
    from iot_pipeline import config

    settings = config.kafka_settings(config.load(config.KAFKA_OPTIONS, [], os.environ))
    return settings.client_config()


def _producer():
    from kafka import KafkaProducer

    return KafkaProducer(**_kafka(), acks="all", linger_ms=0)


def topics(run: str) -> tuple[str, str]:
    """(images, results) topic of one run: a run never reads another's leftovers."""
    return f"iot-baseline-{run}-images", f"iot-baseline-{run}-results"


def produce(run: str, count: int, partitions: int) -> dict:
    """One send per image, each waited for: the original simulator's loop."""
    from iot_pipeline import dataset
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError
    from PIL import Image

    admin = KafkaAdminClient(**_kafka())
    for topic in topics(run):
        try:
            admin.create_topics([NewTopic(topic, partitions, 1)])
        except TopicAlreadyExistsError:
            pass
    admin.close()
    data = dataset.load(os.environ["IOT_SIM_DATASET"], "test")
    producer = _producer()
    started = time.perf_counter()
    for index in range(count):
        pixels = data.images[index % len(data.images)]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        message = {"unique_id": str(uuid.uuid4()),
                   "ground_truth": data.label_names[int(data.labels[index % len(data.labels)])],
                   "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
                   "produced_at": datetime.now(UTC).isoformat()}
        producer.send(topics(run)[0], json.dumps(message).encode()).get(timeout=60)
    producer.close()
    return {"part": "produce", "images": count, "seconds": time.perf_counter() - started}


def server():
    """The WSGI app: `gunicorn 'baseline:server()'`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    from flask import Flask, jsonify, request
    from PIL import Image

    model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    app = Flask("baseline")

    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    @app.post("/predict")
    def predict():
        png = base64.b64decode(request.get_json()["image"])
        image = Image.open(io.BytesIO(png)).convert("RGB").resize((224, 224))
        batch = keras.applications.resnet50.preprocess_input(
            np.asarray(image, dtype=np.float32)[None])
        scores = model.predict(batch, verbose=0)[0]
        best = int(scores.argmax())
        return jsonify({"label": str(best), "score": float(scores[best])})

    return app


def _consumer(topics: list[str], group: str):
    from kafka import KafkaConsumer

    return KafkaConsumer(*topics, **_kafka(), group_id=group, auto_offset_reset="earliest",
                         enable_auto_commit=True)


def _until(count: int, idle_s: float, handle, consumer) -> int:
    """Handle records one at a time until ``count`` are done or none came for ``idle_s``."""
    done, last = 0, time.monotonic()
    while done < count and time.monotonic() - last < idle_s:
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                handle(record)
                done += 1
                last = time.monotonic()
    return done


def classify(run: str, count: int, url: str, idle_s: float) -> dict:
    """One HTTP request and one acknowledged produce per image message."""
    images_topic, results_topic = topics(run)
    producer = _producer()
    consumer = _consumer([images_topic], f"iot-baseline-{run}-classify")

    def handle(record) -> None:
        message = json.loads(record.value)
        request = urllib.request.Request(
            url, data=json.dumps({"image": message["image"]}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        result = {"unique_id": message["unique_id"], "inferred_value": answer["label"],
                  "score": answer["score"]}
        producer.send(results_topic, json.dumps(result).encode()).get(timeout=60)

    started = time.perf_counter()
    done = _until(count, idle_s, handle, consumer)
    consumer.close()
    producer.close()
    return {"part": "classify", "images": done, "seconds": time.perf_counter() - started}


def store(run: str, count: int, idle_s: float) -> dict:
    """One UPSERT and one commit per message of either topic."""
    import psycopg2

    images_topic, _ = topics(run)
    conn = psycopg2.connect(os.environ.get("IOT_DB_DSN", ""), application_name="iot-baseline")
    consumer = _consumer(list(topics(run)), f"iot-baseline-{run}-store")

    def handle(record) -> None:
        message = json.loads(record.value)
        with conn.cursor() as cursor:
            if record.topic == images_topic:
                cursor.execute(
                    f"INSERT INTO {TABLE} (unique_id, ground_truth, data, produced_at,"
                    " image_stored_at) VALUES (%s, %s, %s, %s, now())"
                    " ON CONFLICT (unique_id) DO UPDATE SET ground_truth = excluded.ground_truth,"
                    " data = excluded.data, produced_at = excluded.produced_at,"
                    " image_stored_at = now()",
                    (message["unique_id"], message["ground_truth"],
                     base64.b64decode(message["image"]), message["produced_at"]))
            else:
                cursor.execute(
                    f"INSERT INTO {TABLE} (unique_id, inferred_value, result_stored_at)"
                    " VALUES (%s, %s, now()) ON CONFLICT (unique_id) DO UPDATE"
                    " SET inferred_value = excluded.inferred_value, result_stored_at = now()",
                    (message["unique_id"], message["inferred_value"]))
        conn.commit()

    started = time.perf_counter()
    done = _until(2 * count, idle_s, handle, consumer)
    consumer.close()
    conn.close()
    return {"part": "store", "messages": done, "seconds": time.perf_counter() - started}


def cleanup(run: str) -> dict:
    """Deletes the run's topics (its consumer groups expire with them)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(**_kafka())
    admin.delete_topics(list(topics(run)))
    admin.close()
    return {"part": "cleanup", "deleted": list(topics(run))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("produce", "classify", "store", "cleanup"))
    parser.add_argument("--run", required=True, help="run id: names its topics and groups")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--url", default="http://127.0.0.1:8100/predict")
    parser.add_argument("--idle-s", type=float, default=120,
                        help="stop after this long without a record")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.part == "produce":
        out = produce(args.run, args.count, args.partitions)
    elif args.part == "classify":
        out = classify(args.run, args.count, args.url, args.idle_s)
    elif args.part == "store":
        out = store(args.run, args.count, args.idle_s)
    else:
        out = cleanup(args.run)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
