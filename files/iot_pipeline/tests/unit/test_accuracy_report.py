"""The accuracy report's pure parts: aggregation, the CIFAR-100/ImageNet decision, rendering."""

import json

import pytest

from iot_pipeline import accuracy

# Rows as QUERY returns them: model, classified, with ground truth, agreeing, predictions that
# are ground-truth names, ground-truth names seen, top labels.
ROWS = [
    ("cifar-net", 40, 38, 19, 40, 100, [["apple", 5], ["bear", 4]]),
    ("resnet50-imagenet", 50, 50, 1, 3, 100, [["tabby", 20], ["lion", 3], ["toaster", 2]]),
]


def test_aggregate_counts_agreement_and_label_sets():
    report = accuracy.aggregate(ROWS, generated_at="2026-11-28T12:00:00+00:00")
    cifar, imagenet = report.models
    assert report.truth_labels == 100
    assert (cifar.classified, cifar.agreeing, cifar.with_ground_truth) == (40, 19, 38)
    assert cifar.label_set == accuracy.CIFAR100
    assert cifar.agreement == pytest.approx(0.5)
    assert imagenet.label_set == accuracy.IMAGENET
    assert imagenet.top_labels[0] == ("tabby", 20)
    assert imagenet.most_common_share == pytest.approx(0.4)


@pytest.mark.parametrize(("classified", "in_truth", "expected"), [
    (10, 10, accuracy.CIFAR100),
    (10, 5, accuracy.CIFAR100),   # half: a CIFAR-100 model early on, most names not seen yet
    (10, 4, accuracy.IMAGENET),
    (10, 1, accuracy.IMAGENET),   # ImageNet shares names with CIFAR-100 (lion, tank, ...)
    (0, 0, accuracy.IMAGENET),
])
def test_label_set_is_cifar_when_at_least_half_the_predictions_are_ground_truth_names(
        classified, in_truth, expected):
    assert accuracy.label_set(classified, in_truth) == expected


def test_agreement_is_none_without_ground_truth():
    (model,) = accuracy.aggregate([("m", 3, 0, 0, 3, 0, [["apple", 3]])]).models
    assert model.agreement is None
    assert "top-1 agreement n/a" in accuracy.summary_line(model)


def test_json_round_trip_keeps_the_report():
    report = accuracy.aggregate(ROWS, generated_at="2026-11-28T12:00:00+00:00")
    saved = json.loads(json.dumps(report.to_json()))
    assert saved["models"][0]["top1_agreement"] == pytest.approx(0.5)
    assert accuracy.from_json(saved) == report


def test_from_json_refuses_other_documents():
    with pytest.raises(accuracy.ReportError, match="version"):
        accuracy.from_json({"rows": 3})
    with pytest.raises(accuracy.ReportError, match="not an accuracy report"):
        accuracy.from_json({"version": accuracy.REPORT_VERSION, "models": [{"model": "x"}]})


def test_render_and_summary_lines():
    report = accuracy.aggregate(ROWS, generated_at="2026-11-28T12:00:00+00:00")
    text = accuracy.render(report)
    assert "top-1 agreement 50.0 % (19 of 38 with ground truth)" in text
    assert "most common: tabby (40.0 %)" in text
    assert "toaster" in text
    assert [accuracy.summary_line(m) for m in report.models] == [
        "cifar-net: 40 classified, top-1 agreement 50.0 %",
        "resnet50-imagenet: 50 classified, ImageNet labels; most common: tabby (40.0 %)",
    ]


def test_render_empty_report():
    assert "no classified images yet" in accuracy.render(accuracy.aggregate([]))


def test_from_json_cli_prints_the_table_and_plots(tmp_path, capsys):
    saved = tmp_path / "accuracy.json"
    saved.write_text(json.dumps(accuracy.aggregate(ROWS).to_json()))
    png = tmp_path / "out" / "accuracy.png"
    assert accuracy.main(["--from-json", str(saved), "--plot", str(png)]) == 0
    assert "cifar-net" in capsys.readouterr().out
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_from_json_cli_fails_on_a_missing_file(tmp_path):
    assert accuracy.main(["--from-json", str(tmp_path / "absent.json")]) == 1
