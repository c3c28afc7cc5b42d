"""iot-train on a tiny subset: a checkpoint per epoch, a rerun resumes, the export loads and
classifies; iot-evaluate scores it. Each run is a subprocess (Keras' global policy and seed)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iot_pipeline import resnet
from iot_pipeline.model import Classifier

from harness import CIFAR_DIR

pytestmark = pytest.mark.slow

TINY = ["--data", str(CIFAR_DIR), "--limit", "256", "--batch-size", "64", "--epochs", "2",
        "--input-size", "16", "--progressive", "12:1", "--val-size", "100",
        "--test-limit", "300", "--log-every", "2"]


def iot(module, *args, check=True):
    run = subprocess.run([sys.executable, "-m", f"iot_pipeline.{module}", *map(str, args)],
                         capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    run_dir, prefix = root / "run", root / "out" / "tiny"
    first = iot("train", *TINY, "--run-dir", run_dir, "--export", prefix, "--stop-after", "1")
    second = iot("train", *TINY, "--run-dir", run_dir, "--export", prefix)
    return {"run_dir": run_dir, "prefix": prefix, "first": first, "second": second}


def test_first_run_stops_after_one_epoch_with_a_checkpoint(trained):
    run_dir = trained["run_dir"]
    assert "stopped after epoch 1 of 2" in trained["first"].stdout
    assert "epoch 1/2 step 2/4" in trained["first"].stdout  # progress lines with ETA
    assert "ETA" in trained["first"].stdout
    assert (run_dir / "checkpoint.keras").stat().st_size > 50_000_000
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["seed"] == 20261201
    assert settings["limit"] == 256


def test_rerun_resumes_and_exports_a_card(trained):
    out = trained["second"].stdout
    assert "resuming" in out
    assert "after epoch 1/2" in out
    assert "epoch 1/2 step" not in out  # the finished epoch is not trained again
    history = (trained["run_dir"] / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history] == ["epoch", "1", "2"]
    log = (trained["run_dir"] / "train.log").read_text()
    assert "new run" in log
    assert "resuming" in log
    assert "epoch 2/2 done" in log
    card = resnet.load_card(trained["prefix"].with_name("tiny.card.json"))
    assert card["epochs"] == 2
    assert card["input_size"] == 16
    assert card["test_images"] == 300
    assert len(card["labels"]) == 100
    assert card["labels"][0] == "apple"
    assert 0 <= card["test_top1"] <= card["test_top5"] <= 1
    weights = trained["prefix"].with_name(card["weights"])
    assert resnet.sha256(weights) == card["sha256"]
    assert trained["prefix"].with_name("tiny.curve.png").stat().st_size > 10_000
    assert "epoch 2/2 done" in trained["prefix"].with_name("tiny.train.log").read_text()


def test_other_settings_do_not_resume_silently(trained):
    run = iot("train", *TINY[:-2], "--epochs", "3", "--run-dir", trained["run_dir"], check=False)
    assert run.returncode == 2
    assert "other settings" in run.stdout
    assert "'epochs': (2, 3)" in run.stdout


def test_the_export_loads_and_classifies_into_cifar_labels(trained):
    classifier = Classifier(str(trained["prefix"].with_name("tiny.card.json")), tf_threads=2)
    assert classifier.input_size == 16
    assert classifier.name == "tiny"
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    predictions = classifier.classify(pixels, top_k=3)  # 32 px in, resized to the card's 16
    assert all(p.label in classifier.labels and len(p.top_k) == 3 for p in predictions)
    assert classifier.probabilities(pixels).shape == (3, 100)


def test_a_card_whose_weights_changed_is_refused(trained, tmp_path):
    card = json.loads(trained["prefix"].with_name("tiny.card.json").read_text())
    weights = Path(tmp_path / card["weights"])
    weights.write_bytes(trained["prefix"].with_name(card["weights"]).read_bytes()[:-1] + b"x")
    (tmp_path / "tiny.card.json").write_text(json.dumps(card))
    with pytest.raises(resnet.ModelError, match="sha256 differs from its model card"):
        Classifier(str(tmp_path / "tiny.card.json"))


def test_evaluate_prints_json_and_a_confusion_plot(trained, tmp_path):
    plot = tmp_path / "confusion.png"
    run = iot("evaluate", trained["prefix"].with_name("tiny.card.json"), "--data", CIFAR_DIR,
              "--limit", "200", "--plot", plot)
    result = json.loads(run.stdout)
    assert result["images"] == 200
    assert 0 <= result["top1"] <= result["top5"] <= 1
    assert len(result["worst_classes"]) == 5
    assert plot.stat().st_size > 20_000
    assert result["runtime"] == "tensorflow"


def test_evaluate_scores_the_litert_runtime_and_prints_only_json(trained):
    run = iot("evaluate", trained["prefix"].with_name("tiny.card.json"), "--data", CIFAR_DIR,
              "--limit", "200", "--runtime", "litert-int8")
    result = json.loads(run.stdout)  # the converter's own printing stays off stdout
    assert result["runtime"] == "litert-int8"
    assert result["images"] == 200
    assert 0 <= result["top1"] <= result["top5"] <= 1
