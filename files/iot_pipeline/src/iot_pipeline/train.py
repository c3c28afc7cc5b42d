"""Train the pipeline's ResNet-50 on CIFAR-100 from scratch: resumable, logged, reproducible.

    iot-train --data ../shared/datasets/cifar-100 --run-dir .cache/train/resnet50 \
              --export files/models/resnet50-cifar100

Everything a run needs lives in ``--run-dir``: ``settings.json`` (seed and every setting; a
rerun with other settings is refused unless ``--restart``), ``checkpoint.keras`` (model and
optimizer, written after every epoch, atomically), ``history.csv`` (one row per epoch: loss,
accuracy, held-out top-1/top-5, learning rate, seconds) and ``train.log``.  Running the same
command again continues after the last finished epoch; an interrupted epoch is redone.

The recipe (see files/models/README.md for why): SGD with Nesterov momentum, a one-cycle
learning rate (linear warm-up, cosine decay), decoupled weight decay, label smoothing,
random-crop + flip augmentation, and mixed bfloat16 where the CPU has native bf16 (AVX512-BF16
or AMX), float32 elsewhere.  With ``--export`` the finished model is evaluated on the whole test
split and written as float16 weights + model card + curve.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iot_pipeline import dataset, resnet

log = logging.getLogger("iot_pipeline.train")

CHECKPOINT = "checkpoint.keras"
STATE = "state.json"
SETTINGS = "settings.json"
HISTORY = "history.csv"
HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_top1", "val_top5", "lr", "seconds",
                  "images_per_second")
# Settings that may differ between a run and its resumption without changing the result.
RESUMABLE = {"export", "log_every", "threads", "restart", "run_dir", "data", "stop_after",
             "test_limit"}


class TrainError(RuntimeError):
    """The run cannot start or continue (bad data, settings that differ from the run's)."""


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def _flags(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="iot-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="download",
                   help="CIFAR-100 source (see iot_pipeline.dataset): npz dir, archive or "
                        "'download' (default)")
    p.add_argument("--run-dir", default=".cache/train/resnet50",
                   help="checkpoint, settings, history and log of this run")
    p.add_argument("--export", default="",
                   help="when done, write PREFIX.weights.npz, PREFIX.card.json, "
                        "PREFIX.history.csv, PREFIX.train.log and PREFIX.curve.png")
    p.add_argument("--epochs", type=int, default=13)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input-size", type=int, default=32,
                   help="training and serving image edge (CIFAR is 32; larger is upsampled)")
    p.add_argument("--stem", choices=resnet.STEMS, default="cifar")
    p.add_argument("--progressive", default="24:6", metavar="SIZE:EPOCHS",
                   help="train the first EPOCHS epochs on images resized to SIZE px (cheaper: "
                        "(SIZE/input)^2 of the cost), the rest at --input-size; '' = off")
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=0.25,
                   help="fraction of the steps spent warming up to the peak")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help="L2-equivalent weight decay (applied decoupled, scaled by lr)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16"),
                   default="auto", help="auto: mixed_bfloat16 when the CPU has native bf16")
    p.add_argument("--jit", action="store_true",
                   help="XLA-compile the training step (slower than oneDNN on CPUs measured)")
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--limit", type=int, default=0,
                   help="train on the first N shuffled images only (tests, smoke runs)")
    p.add_argument("--val-size", type=int, default=2000,
                   help="test images scored after every epoch (the curve); 0 = none")
    p.add_argument("--test-limit", type=int, default=0,
                   help="test images scored at export (0 = the whole split)")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0: all cores)")
    p.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="end this invocation after N more epochs (time-boxed sessions); "
                        "the next run continues")
    p.add_argument("--restart", action="store_true",
                   help="discard the run directory's checkpoint and start over")
    return p.parse_args(argv)


# --- data --------------------------------------------------------------------------------------

def _load_split(source: str, split: str):
    try:
        return dataset.load(source, split)
    except dataset.DatasetError as exc:
        raise TrainError(str(exc)) from exc


def epoch_size(settings: dict[str, Any], epoch: int) -> int:
    """The image edge epoch ``epoch`` (0-based) trains at, under ``--progressive``."""
    if settings["progressive"]:
        size, _, epochs = settings["progressive"].partition(":")
        if epoch < int(epochs):
            return int(size)
    return settings["input_size"]


def _train_pipeline(tf, images, labels, settings, epoch_seed: int, size: int):
    """Shuffled, augmented (pad-4 random crop + horizontal flip), batched, prefetched."""
    rng = np.random.default_rng(epoch_seed)
    order = rng.permutation(len(labels))
    ds = tf.data.Dataset.from_tensor_slices((images[order], labels[order].astype(np.int32)))

    def augment(image, label):
        image = tf.image.resize_with_crop_or_pad(image, 40, 40)  # zero pad 4 px
        image = tf.image.random_crop(image, (32, 32, 3), seed=epoch_seed)
        image = tf.image.random_flip_left_right(image, seed=epoch_seed)
        if size != 32:
            image = tf.cast(tf.image.resize(tf.cast(image, tf.float32), (size, size)), tf.uint8)
        return image, label

    options = tf.data.Options()
    options.deterministic = True
    return (ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(settings["batch_size"], drop_remainder=True)
            .with_options(options)
            .prefetch(2))


# --- schedule, checkpoint, progress --------------------------------------------------------------

def _schedule_class():
    import keras

    @keras.saving.register_keras_serializable(package="iot_pipeline")
    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up from peak/20 to ``peak`` over ``warmup`` of the steps, cosine to 0."""

        def __init__(self, peak: float, total_steps: int, warmup: float) -> None:
            self.peak, self.total_steps, self.warmup = float(peak), int(total_steps), float(warmup)

        def __call__(self, step):
            from keras import ops

            step = ops.cast(step, "float32")
            total = float(max(self.total_steps, 1))
            up = max(self.warmup * total, 1.0)
            start = self.peak / 20.0
            rise = start + (self.peak - start) * step / up
            progress = ops.clip((step - up) / max(total - up, 1.0), 0.0, 1.0)
            fall = 0.5 * self.peak * (1.0 + ops.cos(math.pi * progress))
            return ops.where(step < up, rise, fall)

        def get_config(self) -> dict[str, Any]:
            return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup}

    return OneCycle


def _atomic_json(path: Path, data: Any) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


def _callbacks(keras, run_dir: Path, settings, steps: int, val, started_epoch: int):
    class Progress(keras.callbacks.Callback):
        """A line every N steps with images/s and the epoch's and the run's ETA."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.t0 = epoch, time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            done = batch + 1
            if done % settings["log_every"] and done != steps:
                return
            elapsed = time.monotonic() - self.t0
            rate = done * settings["batch_size"] / max(elapsed, 1e-9)
            left_epoch = (steps - done) * settings["batch_size"] / rate
            left_run = left_epoch + (settings["epochs"] - self.epoch - 1) * steps * \
                settings["batch_size"] / rate
            log.info("epoch %d/%d step %d/%d loss %.4f acc %.4f | %.0f img/s | "
                     "epoch ETA %s, run ETA %s", self.epoch + 1, settings["epochs"], done,
                     steps, logs.get("loss", float("nan")), logs.get("accuracy", float("nan")),
                     rate, _hms(left_epoch), _hms(left_run))

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.monotonic() - self.t0
            row = {"epoch": epoch + 1, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
                   "val_top1": "", "val_top5": "",
                   "lr": float(keras.ops.convert_to_numpy(
                       self.model.optimizer.learning_rate)),
                   "seconds": round(seconds, 1),
                   "images_per_second": round(steps * settings["batch_size"] / seconds, 1)}
            if val is not None:
                probs = resnet.predict(self.model, val[0])
                row["val_top1"] = round(resnet.top_k_accuracy(probs, val[1], 1), 4)
                row["val_top5"] = round(resnet.top_k_accuracy(probs, val[1], 5), 4)
            # Checkpoint first, then the state that points at it: a crash in between redoes
            # this epoch from the previous checkpoint, never skips one.
            partial = run_dir / (CHECKPOINT + ".part.keras")
            self.model.save(partial)
            partial.replace(run_dir / CHECKPOINT)
            with open(run_dir / HISTORY, "a", newline="") as handle:
                csv.DictWriter(handle, HISTORY_FIELDS).writerow(row)
            _atomic_json(run_dir / STATE, {"epochs_done": epoch + 1})
            log.info("epoch %d/%d done in %s: loss %.4f acc %.4f val top-1 %s top-5 %s "
                     "(checkpoint saved)", epoch + 1, settings["epochs"], _hms(seconds),
                     row["loss"], row["accuracy"], row["val_top1"], row["val_top5"])

    return [Progress(), keras.callbacks.TerminateOnNaN()]


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: v for k, v in vars(args).items()}
    if settings["progressive"]:
        size, sep, epochs = settings["progressive"].partition(":")
        if not (sep and size.isdigit() and epochs.isdigit() and int(size) >= 8):
            raise TrainError(f"--progressive must look like 24:6 (SIZE:EPOCHS), not "
                             f"{settings['progressive']!r}")
    if settings["precision"] == "auto":
        settings["precision"] = "mixed_bfloat16" if cpu_has_bf16() else "float32"
    return settings


def _check_resume(run_dir: Path, settings: dict[str, Any]) -> None:
    path = run_dir / SETTINGS
    if not path.is_file():
        _atomic_json(path, settings)
        return
    stored = json.loads(path.read_text())
    differ = {k: (stored.get(k), v) for k, v in settings.items()
              if k not in RESUMABLE and stored.get(k) != v}
    if differ:
        raise TrainError(
            f"{run_dir} holds a run with other settings ({differ}); use the same flags to "
            f"continue it, another --run-dir, or --restart to discard it")


# --- main ----------------------------------------------------------------------------------------

def train(settings: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(settings["run_dir"]).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    if settings["restart"]:
        for name in (CHECKPOINT, STATE, SETTINGS, HISTORY):
            (run_dir / name).unlink(missing_ok=True)
    _check_resume(run_dir, settings)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("iot_pipeline").addHandler(handler)

    if settings["threads"]:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(settings["threads"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(settings["seed"])
    keras.mixed_precision.set_global_policy(settings["precision"])

    train_split = _load_split(settings["data"], "train")
    test_split = _load_split(settings["data"], "test")
    rng = np.random.default_rng(settings["seed"])
    order = rng.permutation(len(train_split))
    if settings["limit"]:
        order = order[:settings["limit"]]
    images, labels = train_split.images[order], train_split.labels[order]
    val = None
    if settings["val_size"]:
        pick = np.random.default_rng(settings["seed"] + 1).permutation(len(test_split))
        pick = pick[:settings["val_size"]]
        val = (test_split.images[pick], test_split.labels[pick].astype(np.int64))
    steps = len(labels) // settings["batch_size"]
    if steps == 0:
        raise TrainError(f"{len(labels)} images make no batch of {settings['batch_size']}")
    one_cycle = _schedule_class()

    state_path, checkpoint = run_dir / STATE, run_dir / CHECKPOINT
    done = json.loads(state_path.read_text())["epochs_done"] if state_path.is_file() else 0
    if done and checkpoint.is_file():
        log.info("resuming %s after epoch %d/%d", run_dir, done, settings["epochs"])
        model = keras.models.load_model(checkpoint)
    else:
        done = 0
        (run_dir / HISTORY).unlink(missing_ok=True)
        with open(run_dir / HISTORY, "w", newline="") as handle:
            csv.DictWriter(handle, HISTORY_FIELDS).writeheader()
        # Any input size while training (progressive resizing); export fixes input_size.
        model = resnet.build(len(train_split.label_names), None, settings["stem"])
        optimizer = keras.optimizers.SGD(
            learning_rate=one_cycle(settings["lr"], steps * settings["epochs"], settings["warmup"]),
            momentum=settings["momentum"], nesterov=True,
            # Keras decays by wd * lr outside the momentum; x1/(1 - momentum) matches L2 + SGD.
            weight_decay=settings["weight_decay"] / (1 - settings["momentum"]),
        )
        optimizer.exclude_from_weight_decay(var_names=["_bn", "bias"])
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings["label_smoothing"]),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=settings["jit"],
        )
        log.info("new run in %s: %s images, %d steps/epoch x %d epochs, %s, seed %d, "
                 "%s parameters", run_dir, len(labels), steps, settings["epochs"],
                 settings["precision"], settings["seed"], f"{model.count_params():,}")
    num_classes = len(train_split.label_names)
    callbacks = _callbacks(keras, run_dir, settings, steps, val, done)
    started = time.monotonic()
    last = settings["epochs"]
    if settings["stop_after"]:
        last = min(last, done + settings["stop_after"])
    for epoch in range(done, last):
        # One fit() per epoch, so each epoch's shuffle and augmentation come from the seed and
        # the epoch number alone: a resumed run sees the same data as an uninterrupted one.
        size = epoch_size(settings, epoch)
        if size != settings["input_size"]:
            log.info("epoch %d/%d trains at %d px (progressive resizing)", epoch + 1,
                     settings["epochs"], size)
        data = _train_pipeline(tf, images, labels, settings, settings["seed"] * 1000 + epoch,
                               size)
        data = data.map(lambda x, y: (x, tf.one_hot(y, num_classes)))
        history = model.fit(data, epochs=epoch + 1, initial_epoch=epoch, verbose=0,
                            callbacks=callbacks)
        if not np.isfinite(history.history["loss"][-1]):
            raise TrainError(f"loss became {history.history['loss'][-1]} in epoch {epoch + 1}")
    return {"model": model, "run_dir": run_dir, "test": test_split,
            "session_seconds": time.monotonic() - started,
            "finished": last == settings["epochs"]}


def export(result: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Float16 weights + card + history + curve under the ``--export`` prefix."""
    import keras

    prefix = Path(settings["export"])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    run_dir, test = result["run_dir"], result["test"]
    # Serve in float32: rebuild without the training policy and copy the weights in.
    keras.mixed_precision.set_global_policy("float32")
    model = resnet.build(len(test.label_names), settings["input_size"], settings["stem"])
    model.set_weights(result["model"].get_weights())
    weights_path = prefix.with_name(prefix.name + ".weights.npz")
    digest = resnet.save_weights(model, weights_path)
    # Score what was exported (float16, read back), not the training copy.
    resnet.load_weights(model, weights_path, digest)
    limit = settings["test_limit"] or len(test)
    probs = resnet.predict(model, test.images[:limit])
    with open(run_dir / HISTORY) as handle:
        rows = list(csv.DictReader(handle))
    card = {
        "name": prefix.name,
        "architecture": resnet.ARCHITECTURE,
        "stem": settings["stem"],
        "input_size": settings["input_size"],
        "labels": list(test.label_names),
        "weights": weights_path.name,
        "sha256": digest,
        "weights_dtype": "float16",
        "parameters": model.count_params(),
        "test_images": int(limit),
        "test_top1": round(resnet.top_k_accuracy(probs, test.labels[:limit], 1), 4),
        "test_top5": round(resnet.top_k_accuracy(probs, test.labels[:limit], 5), 4),
        "epochs": len(rows),
        "train_seconds": round(sum(float(r["seconds"]) for r in rows), 1),
        "train_images": settings["limit"] or 50000,
        "settings": {k: v for k, v in settings.items()
                     if k not in {"export", "restart", "run_dir", "log_every", "data"}},
        "machine": {"cpus": os.cpu_count(), "cpu_bf16": cpu_has_bf16(),
                    "python": platform.python_version(),
                    "tensorflow": __import__("tensorflow").__version__,
                    "keras": keras.__version__},
        "history": prefix.name + ".history.csv",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    resnet.write_card(prefix.with_name(prefix.name + ".card.json"), card)
    prefix.with_name(prefix.name + ".history.csv").write_text((run_dir / HISTORY).read_text())
    prefix.with_name(prefix.name + ".train.log").write_text((run_dir / "train.log").read_text())
    _plot(rows, card, prefix.with_name(prefix.name + ".curve.png"))
    log.info("exported %s: test top-1 %.4f top-5 %.4f on %d images", weights_path,
             card["test_top1"], card["test_top5"], limit)
    return card


def _plot(rows, card, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib not installed; no curve written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [float(r["loss"]) for r in rows], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss (label-smoothed)", title="loss")
    ax2.plot(epochs, [float(r["accuracy"]) for r in rows], marker="o", label="train (augmented)")
    if rows and rows[0]["val_top1"]:
        ax2.plot(epochs, [float(r["val_top1"]) for r in rows], marker="o",
                 label="test top-1 (2,000 held out)")
        ax2.plot(epochs, [float(r["val_top5"]) for r in rows], marker=".", linestyle="--",
                 label="test top-5")
    ax2.axhline(card["test_top1"], color="grey", linestyle=":",
                label=f"final top-1, {card['test_images']:,} test images: {card['test_top1']:.3f}")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title=card["name"])
    ax2.legend(loc="lower right", fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    try:
        settings = _settings(_flags(argv))
        result = train(settings)
        if not result["finished"]:
            log.info("stopped after epoch %d of %d (--stop-after); rerun to continue",
                     json.loads((result["run_dir"] / STATE).read_text())["epochs_done"],
                     settings["epochs"])
        elif settings["export"]:
            card = export(result, settings)
            print(json.dumps({k: card[k] for k in ("name", "test_top1", "test_top5", "epochs",
                                                   "train_seconds", "sha256")}))
    except (TrainError, resnet.ModelError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
