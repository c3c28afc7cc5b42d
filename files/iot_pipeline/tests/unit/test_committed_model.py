"""The model the repo ships (files/models/): the card is complete and true, the weights are the
card's, and they classify the CIFAR-100 test split about as well as the card says."""

import json
from pathlib import Path

import pytest

from iot_pipeline import evaluate, resnet

from harness import CIFAR_DIR

CARD = Path(__file__).resolve().parents[3] / "models" / "resnet50-cifar100.card.json"


@pytest.fixture(scope="module")
def card():
    return resnet.load_card(CARD)


def test_card_is_complete_and_meets_the_target(card):
    assert CIFAR_DIR.is_dir(), f"real CIFAR-100 expected at {CIFAR_DIR} (set IOT_TEST_CIFAR_DIR)"
    meta = json.loads((CIFAR_DIR / "meta.json").read_text())
    assert card["architecture"] == "resnet50"
    assert card["stem"] == "cifar"
    assert card["input_size"] == 32
    assert card["labels"] == meta["fine_label_names"]  # output order = CIFAR-100's fine labels
    assert card["test_images"] == 10_000
    assert card["test_top1"] >= 0.60
    assert card["test_top1"] <= card["test_top5"] <= 1


def test_weights_are_the_cards_and_small_enough(card):
    weights = CARD.with_name(card["weights"])
    assert resnet.sha256(weights) == card["sha256"]
    assert weights.stat().st_size <= 50_000_000
    history = CARD.with_name(card["history"]).read_text().splitlines()
    assert len(history) == card["epochs"] + 1


@pytest.mark.slow
def test_1000_test_images_score_what_the_card_says(card):
    result = evaluate.evaluate(CARD, str(CIFAR_DIR), limit=1000)
    assert result["images"] == 1000
    assert len(result["per_class_top1"]) == 100  # spread: every class is scored
    assert result["top1"] >= card["test_top1"] - 0.03
    assert result["top5"] >= card["test_top5"] - 0.03
