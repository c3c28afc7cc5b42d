"""The accuracy report against a real PostgreSQL: exact counts from rows the DB consumer wrote."""

import dataclasses
import json

import pytest

from iot_pipeline import accuracy, store

from harness import image_message, result_message

pytestmark = pytest.mark.integration

CIFAR = ("apple", "bear", "castle", "lion", "tank")


def fill(dsn: str) -> None:
    """20 images; a CIFAR-100 model right on 15; an ImageNet model on all 20 plus one orphan."""
    conn = store.connect(dsn)
    try:
        store.migrate(conn)
        images = [image_message(f"img-{i}", i, CIFAR[i % len(CIFAR)]) for i in range(20)]
        cifar_results = [
            dataclasses.replace(result_message(f"img-{i}", CIFAR[i % len(CIFAR)]
                                               if i < 15 else CIFAR[(i + 1) % len(CIFAR)]),
                                model="cifar-net")
            for i in range(20)
        ]
        # Same images again under new ids for the second model (one row per unique_id).
        images += [image_message(f"in-{i}", i, CIFAR[i % len(CIFAR)]) for i in range(20)]
        # ImageNet: "lion" (a CIFAR-100 name too) on 2 images, one right; "tabby" on 12.
        imagenet_labels = ["tabby"] * 12 + ["lion", "lion"] + ["toaster"] * 6
        imagenet_results = [
            dataclasses.replace(result_message(f"in-{i}", label), model="resnet50-imagenet")
            for i, label in enumerate(imagenet_labels)
        ]
        # A result whose image has not arrived: classified, but no ground truth to compare.
        imagenet_results.append(dataclasses.replace(result_message("orphan", "tabby"),
                                                    model="resnet50-imagenet"))
        store.write_batch(conn, images, cifar_results + imagenet_results)
    finally:
        conn.close()


def test_report_counts_and_agreement_per_model(pg_dsn):
    fill(pg_dsn)
    report = accuracy.fetch(pg_dsn)
    assert [m.model for m in report.models] == ["cifar-net", "resnet50-imagenet"]
    cifar, imagenet = report.models
    assert report.truth_labels == len(CIFAR)
    assert (cifar.classified, cifar.with_ground_truth, cifar.agreeing) == (20, 20, 15)
    assert cifar.label_set == accuracy.CIFAR100
    assert cifar.agreement == pytest.approx(0.75)
    # Per ground-truth class: images and agreeing predictions, summing to the totals.
    # (images 15-19 are wrong, one of each class), by class name.
    assert cifar.per_class == [(label, 4, 3) for label in sorted(CIFAR)]
    assert (imagenet.classified, imagenet.with_ground_truth) == (21, 20)
    # in-13 shows a lion (13 % 5 == 3) and the model said lion; in-12 shows a castle.
    assert (imagenet.agreeing, imagenet.in_truth_labels) == (1, 2)
    assert imagenet.label_set == accuracy.IMAGENET
    assert imagenet.top_labels == [("tabby", 13), ("toaster", 6), ("lion", 2)]
    assert imagenet.most_common_share == pytest.approx(13 / 21)


def test_cli_prints_json_and_writes_a_png(pg_dsn, tmp_path, capsys, monkeypatch):
    fill(pg_dsn)
    monkeypatch.setenv("IOT_DB_DSN", pg_dsn)
    png = tmp_path / "accuracy.png"
    assert accuracy.main(["--json", "--plot", str(png)]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert {m["model"]: m["classified"] for m in saved["models"]} == {
        "cifar-net": 20, "resnet50-imagenet": 21}
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_each_model_version_is_reported_apart(pg_dsn):
    conn = store.connect(pg_dsn)
    try:
        store.migrate(conn)
        images = [image_message(f"img-{i}", i, CIFAR[i % len(CIFAR)]) for i in range(6)]
        results = [dataclasses.replace(result_message(f"img-{i}", CIFAR[i % len(CIFAR)]),
                                       model="cifar-net",
                                       model_version="v1" if i < 4 else "v2")
                   for i in range(6)]
        store.write_batch(conn, images, results)
    finally:
        conn.close()
    report = accuracy.fetch(pg_dsn)
    assert {m.model: m.classified for m in report.models} == {"cifar-net@v1": 4,
                                                              "cifar-net@v2": 2}


def test_missing_table_is_a_clear_error(pg_dsn):
    with pytest.raises(accuracy.ReportError, match="migrate-only"):
        accuracy.fetch(pg_dsn)


def test_empty_table_reports_no_models(pg_dsn):
    conn = store.connect(pg_dsn)
    try:
        store.migrate(conn)
    finally:
        conn.close()
    assert accuracy.fetch(pg_dsn).models == []
