"""Score a model card's weights on the CIFAR-100 test split: top-1, top-5, per class, confusion.

    iot-evaluate files/models/resnet50-cifar100.card.json --data ../shared/datasets/cifar-100 \
                 [--limit 1000] [--plot bench/results/confusion.png] [--runtime tensorflow]

Prints one JSON object.  ``--limit N`` scores N images spread evenly over the split (every
``10000/N``-th image, so every class is represented: the split is ordered by class in some
copies), always the same ones.  The card's sha256 is checked before anything is scored.
``--runtime`` runs the model as the ML server would (iot_pipeline.model; default ``tensorflow``,
what the card's own figures were measured with): ``litert-int8`` scores what is deployed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iot_pipeline import dataset, resnet
from iot_pipeline.model import RUNTIMES, forward_function
from iot_pipeline.resnet import ModelError

log = logging.getLogger("iot_pipeline.evaluate")


def spread(total: int, limit: int) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(total)`` (all of them when limit is 0)."""
    if not limit or limit >= total:
        return np.arange(total)
    return np.linspace(0, total, limit, endpoint=False).astype(np.int64)


def evaluate(card_path: str | Path, source: str, limit: int = 0,
             weights: str | None = None, batch_size: int = 250,
             runtime: str = "tensorflow") -> dict[str, Any]:
    model, card = resnet.model_from_card(card_path, weights)
    forward = forward_function(model, runtime=runtime)

    def predict(images):
        return np.concatenate([forward(images[at:at + batch_size])
                               for at in range(0, len(images), batch_size)])
    try:
        test = dataset.load(source, "test")
    except dataset.DatasetError as exc:
        raise ModelError(str(exc)) from exc
    if list(test.label_names) != list(card["labels"]):
        raise ModelError(f"the model card's labels differ from the dataset's ({source})")
    pick = spread(len(test), limit)
    images, labels = test.images[pick], test.labels[pick].astype(np.int64)
    started = time.perf_counter()
    probs = predict(images)
    seconds = time.perf_counter() - started
    predicted = probs.argmax(axis=1)
    classes = len(card["labels"])
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {
        card["labels"][c]: round(float(confusion[c, c] / confusion[c].sum()), 4)
        for c in range(classes) if confusion[c].sum()
    }
    ranked = sorted(per_class.items(), key=lambda kv: kv[1])
    return {
        "card": str(card_path),
        "model": card.get("name"),
        "runtime": runtime,
        "sha256": card["sha256"],
        "images": len(pick),
        "top1": round(resnet.top_k_accuracy(probs, labels, 1), 4),
        "top5": round(resnet.top_k_accuracy(probs, labels, 5), 4),
        "card_test_top1": card["test_top1"],
        "card_test_top5": card["test_top5"],
        "worst_classes": ranked[:5],
        "best_classes": ranked[-5:][::-1],
        "per_class_top1": per_class,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(pick) / seconds, 1) if seconds else None,
        "_confusion": confusion,
    }


def plot(result: dict[str, Any], labels: Sequence[str], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = result["_confusion"]
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(18, 9), gridspec_kw={"width_ratios": [3, 1]})
    ax1.imshow(share, cmap="viridis", vmin=0, vmax=1)
    ax1.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    ax1.set_yticks(range(len(labels)), labels, fontsize=5)
    ax1.set(xlabel="predicted", ylabel="true",
            title=f"{result['model']}: confusion over {result['images']:,} test images "
                  f"(row-normalised); top-1 {result['top1']:.3f}, top-5 {result['top5']:.3f}")
    diagonal = np.diag(share)
    order = np.argsort(diagonal)
    ax2.barh(range(len(labels)), diagonal[order], color="tab:blue")
    ax2.set_yticks(range(len(labels)), [labels[i] for i in order], fontsize=5)
    ax2.axvline(result["top1"], color="grey", linestyle=":")
    ax2.set(xlim=(0, 1), xlabel="top-1 per class", title="per-class accuracy")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    p = argparse.ArgumentParser(prog="iot-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("card", help="model card (*.card.json); its weights file lies beside it")
    p.add_argument("--weights", default=None, help="another weights file for the card's network")
    p.add_argument("--data", default="download", help="CIFAR-100 source (see iot-train)")
    p.add_argument("--limit", type=int, default=0, help="score N spread test images (0 = all)")
    p.add_argument("--plot", default="", help="write the confusion / per-class plot PNG here")
    p.add_argument("--per-class", action="store_true", help="print every class's top-1 too")
    p.add_argument("--runtime", default="tensorflow", choices=RUNTIMES,
                   help="what runs the model, as in the ML server (default: tensorflow)")
    args = p.parse_args(argv)
    try:
        result = evaluate(args.card, args.data, args.limit, args.weights, runtime=args.runtime)
    except ModelError as exc:
        log.error("%s", exc)
        return 2
    if args.plot:
        plot(result, resnet.load_card(args.card)["labels"], args.plot)
        result["plot"] = args.plot
    if not args.per_class:
        result.pop("per_class_top1")
    result.pop("_confusion")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
