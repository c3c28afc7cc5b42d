"""DB host / controller: per-model accuracy report from ``iot_image_data``.

On the database host ``iot-accuracy`` reads the table (one query, grouped by ``model_name`` and
``model_version``: a model is ``name@version``, or ``name`` for rows without a version) and
reports per model the images classified and, when the model answers with CIFAR-100 names, the
top-1 agreement of ``inferred_value`` with ``ground_truth``; a model answering with other names
(the ImageNet ResNet-50) gets the distribution of its predicted labels instead. ``--json`` prints
the report as JSON; on the controller ``--from-json`` renders and ``--plot`` draws a saved one.

Which models answer with CIFAR-100 names is decided from the data, nothing shipped: the names
are the ground-truth values seen in the table, and a model is a CIFAR-100 model when at least
half of its predictions are among them. "Never among them" would be wrong: 23 ImageNet class
names are CIFAR-100 names too (beaver, lion, tank, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iot_pipeline import config
from iot_pipeline.config import ConfigError, Option
from iot_pipeline.runtime import configure_logging

log = logging.getLogger("iot_pipeline.accuracy")

# Report format version, in the JSON so that a controller can refuse what it cannot read.
REPORT_VERSION = 1
TOP_LABELS = 10
CIFAR100 = "cifar-100"
IMAGENET = "imagenet"

OPTIONS: tuple[Option, ...] = (
    Option("log_level", "IOT_LOG_LEVEL", "logging level", default="INFO",
           check=lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
           check_message="must be DEBUG, INFO, WARNING or ERROR"),
    Option("dsn", "IOT_DB_DSN",
           "libpq connection string; empty uses PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD",
           default=""),
)

# Rows with a prediction, per model: how many, how many have their image's ground truth, how
# many agree with it, how many predictions are ground-truth names, the most common labels, and
# per ground-truth class the images and the agreeing predictions.
QUERY = """
WITH classified AS (
    SELECT coalesce(model_name, '(unknown)') || coalesce('@' || model_version, '') AS model,
           ground_truth, inferred_value
    FROM iot_image_data WHERE inferred_value IS NOT NULL
), truth AS (
    SELECT DISTINCT ground_truth AS label FROM iot_image_data WHERE ground_truth IS NOT NULL
), per_label AS (
    SELECT model, inferred_value AS label, count(*) AS n,
           row_number() OVER (PARTITION BY model ORDER BY count(*) DESC, inferred_value) AS rank
    FROM classified GROUP BY model, inferred_value
), per_class AS (
    SELECT model, ground_truth AS label, count(*) AS n,
           count(*) FILTER (WHERE inferred_value = ground_truth) AS agreeing
    FROM classified WHERE ground_truth IS NOT NULL GROUP BY model, ground_truth
)
SELECT c.model,
       count(*) AS classified,
       count(c.ground_truth) AS with_ground_truth,
       count(*) FILTER (WHERE c.inferred_value = c.ground_truth) AS agreeing,
       count(*) FILTER (WHERE c.inferred_value IN (SELECT label FROM truth)) AS in_truth_labels,
       (SELECT count(*) FROM truth) AS truth_labels,
       (SELECT json_agg(json_build_array(p.label, p.n) ORDER BY p.rank)
          FROM per_label p WHERE p.model = c.model AND p.rank <= %(top)s) AS top_labels,
       (SELECT json_agg(json_build_array(k.label, k.n, k.agreeing) ORDER BY k.label)
          FROM per_class k WHERE k.model = c.model) AS per_class
FROM classified c
GROUP BY c.model
ORDER BY c.model
"""


class ReportError(RuntimeError):
    """The table cannot be read, or a saved report is not one this code understands."""


@dataclass(frozen=True)
class ModelReport:
    """One model's line of the report."""

    model: str
    classified: int
    with_ground_truth: int
    agreeing: int
    in_truth_labels: int
    label_set: str
    top_labels: list[tuple[str, int]] = field(default_factory=list)
    # (ground-truth class, images, agreeing predictions), by class name.
    per_class: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement over the rows whose image (and so ground truth) arrived."""
        return self.agreeing / self.with_ground_truth if self.with_ground_truth else None

    @property
    def most_common_share(self) -> float | None:
        return self.top_labels[0][1] / self.classified if self.top_labels else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["top_labels"] = [list(pair) for pair in self.top_labels]
        data["per_class"] = [list(row) for row in self.per_class]
        data["top1_agreement"] = self.agreement
        data["most_common_share"] = self.most_common_share
        return data


@dataclass(frozen=True)
class Report:
    generated_at: str
    truth_labels: int
    models: list[ModelReport]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "generated_at": self.generated_at,
            "truth_labels": self.truth_labels,
            "models": [model.to_json() for model in self.models],
        }


def label_set(classified: int, in_truth_labels: int) -> str:
    """CIFAR-100 when at least half the predictions are ground-truth names, else ImageNet."""
    return CIFAR100 if classified and 2 * in_truth_labels >= classified else IMAGENET


def aggregate(rows: Iterable[Sequence[Any]], generated_at: str | None = None) -> Report:
    """Turn :data:`QUERY`'s rows into a report."""
    models = []
    truth_labels = 0
    for model, classified, with_truth, agreeing, in_truth, truths, top, *rest in rows:
        per_class = rest[0] if rest else None
        truth_labels = int(truths)
        models.append(ModelReport(
            model=str(model), classified=int(classified), with_ground_truth=int(with_truth),
            agreeing=int(agreeing), in_truth_labels=int(in_truth),
            label_set=label_set(int(classified), int(in_truth)),
            top_labels=[(str(label), int(n)) for label, n in (top or [])],
            per_class=[(str(label), int(n), int(ok)) for label, n, ok in (per_class or [])],
        ))
    return Report(generated_at or datetime.now(UTC).isoformat(timespec="seconds"),
                  truth_labels, models)


def from_json(data: Mapping[str, Any]) -> Report:
    """A report saved with ``--json``."""
    if data.get("version") != REPORT_VERSION:
        raise ReportError(f"report version {data.get('version')!r}, expected {REPORT_VERSION}")
    try:
        models = [ModelReport(
            model=m["model"], classified=m["classified"],
            with_ground_truth=m["with_ground_truth"], agreeing=m["agreeing"],
            in_truth_labels=m["in_truth_labels"], label_set=m["label_set"],
            top_labels=[(label, n) for label, n in m["top_labels"]],
            per_class=[(label, n, ok) for label, n, ok in m.get("per_class", [])],
        ) for m in data["models"]]
        return Report(data["generated_at"], data["truth_labels"], models)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"not an accuracy report: {exc!r}") from exc


def fetch(dsn: str) -> Report:
    """Run :data:`QUERY` on the database ``dsn`` names; ReportError if it cannot be read."""
    # Imported here: the controller renders and plots saved reports without psycopg2.
    import psycopg2
    import psycopg2.errors

    from iot_pipeline import store

    try:
        conn = store.connect(dsn)
    except store.StoreUnavailable as exc:
        raise ReportError(f"cannot connect to PostgreSQL: {exc}") from exc
    try:
        with conn, conn.cursor() as cur:
            cur.execute(QUERY, {"top": TOP_LABELS})
            rows = cur.fetchall()
    except psycopg2.errors.UndefinedTable as exc:
        raise ReportError(
            "table iot_image_data is missing: run `db-consumer --migrate-only` first"
        ) from exc
    except psycopg2.Error as exc:
        raise ReportError(f"cannot read iot_image_data: {str(exc).strip()}") from exc
    finally:
        conn.close()
    log.debug("%d models in iot_image_data", len(rows))
    return aggregate(rows)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def summary_line(model: ModelReport) -> str:
    """One line per model, as status.yml prints it."""
    head = f"{model.model}: {model.classified} classified, "
    if model.label_set == CIFAR100:
        return head + f"top-1 agreement {_percent(model.agreement)}"
    if not model.top_labels:
        return head + "ImageNet labels"
    label, _n = model.top_labels[0]
    return head + f"ImageNet labels; most common: {label} ({_percent(model.most_common_share)})"


def render(report: Report) -> str:
    """The human-readable table."""
    lines = [
        f"accuracy report of {report.generated_at}: {len(report.models)} model(s), "
        f"{report.truth_labels} ground-truth labels seen",
    ]
    if not report.models:
        lines.append("no classified images yet")
    name_width = max([len("model"), *(len(m.model) for m in report.models)])
    if report.models:
        lines.append(f"{'model':<{name_width}}  {'classified':>10}  labels     result")
    for model in report.models:
        prefix = f"{model.model:<{name_width}}  {model.classified:>10}  {model.label_set:<9}  "
        if model.label_set == CIFAR100:
            lines.append(prefix + f"top-1 agreement {_percent(model.agreement)} "
                         f"({model.agreeing} of {model.with_ground_truth} with ground truth)")
            continue
        share = _percent(model.most_common_share)
        lines.append(prefix + (f"most common: {model.top_labels[0][0]} ({share})"
                               if model.top_labels else "no labels"))
        for label, n in model.top_labels:
            lines.append(f"{'':<{name_width + 25}}{n:>6}  {label}")
    return "\n".join(lines)


def plot(report: Report, path: Path) -> Path:
    """A panel per model: per-class top-1 for CIFAR-100 models, the top labels otherwise."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a controller or in CI
    import matplotlib.pyplot as plt

    panels = max(1, len(report.models))
    wide = any(m.label_set == CIFAR100 and m.per_class for m in report.models)
    fig, axes = plt.subplots(panels, 1, figsize=(16 if wide else 8, 1.5 + 4 * panels),
                             squeeze=False)
    for ax, model in zip(axes[:, 0], report.models, strict=False):
        if model.label_set == CIFAR100 and model.per_class:
            ranked = sorted(model.per_class, key=lambda row: (row[2] / row[1], row[0]))
            shares = [ok / n for _label, n, ok in ranked]
            ax.bar(range(len(ranked)), shares, color="tab:green")
            ax.set_xticks(range(len(ranked)), [row[0] for row in ranked], rotation=90,
                          fontsize=6)
            ax.axhline(model.agreement or 0, color="grey", linestyle=":",
                       label=f"all classes: {_percent(model.agreement)}")
            ax.set(ylim=(0, 1), ylabel="top-1 agreement",
                   title=f"{model.model}: top-1 agreement {_percent(model.agreement)} of "
                         f"{model.with_ground_truth}, per ground-truth class "
                         f"({len(ranked)} classes, lowest first)")
            ax.legend(loc="upper left", fontsize=8)
        elif model.label_set == CIFAR100:
            wrong = model.with_ground_truth - model.agreeing
            ax.barh(["agree", "disagree"], [model.agreeing, wrong], color=["tab:green", "tab:red"])
            ax.set_title(f"{model.model}: top-1 agreement {_percent(model.agreement)} "
                         f"of {model.with_ground_truth}")
            ax.set_xlabel("images")
        else:
            labels = [label for label, _ in reversed(model.top_labels)]
            shares = [100 * n / model.classified for _, n in reversed(model.top_labels)]
            ax.barh(labels, shares, color="tab:blue")
            ax.set_title(f"{model.model}: {model.classified} classified, "
                         f"top {len(labels)} predicted labels (ImageNet)")
            ax.set_xlabel("% of predictions")
    if not report.models:
        axes[0, 0].set_title("no classified images yet")
    fig.suptitle(f"iot_image_data accuracy, {report.generated_at}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("plot written to %s", path)
    return path


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the report here")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="read a report saved with --json instead of the database")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        values = config.load(OPTIONS, argv, prog="iot-accuracy",
                             description=__doc__.splitlines()[0], extra_flags=_flags)
    except ConfigError as exc:
        print(f"iot-accuracy: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(values["log_level"])
    try:
        if values["from_json"] is not None:
            report = from_json(json.loads(values["from_json"].read_text()))
        else:
            report = fetch(values["dsn"])
    except (ReportError, OSError, json.JSONDecodeError) as exc:
        log.error("%s", exc)
        return 1
    # The report is this command's output (stdout); logging goes to stderr.
    print(json.dumps(report.to_json(), indent=2) if values["json"] else render(report))
    if values["plot"] is not None:
        plot(report, values["plot"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
