"""MODEL_CARD.md: what a stored model is, how it was made, how well it does and for whom, what not to use
it for. Written by `export` into the model folder from the same metadata the service reads; served at
GET /model_card and shown on the page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from models.artifact import MINOR_AGE, ModelMeta
from models.runtime import format_cost, int8_verdict

LIMITS = """\
## Intended use
- Research, demos and aggregate analytics (for example the age distribution of consenting participants in
  a photo collection), where an individual error costs little and a person can look at the photo.

## Not intended for
- Deciding anything about an individual: access to age-restricted goods or content, employment, credit,
  policing, immigration. `minor_probability` is an estimate with known error on children, not an age
  check on its own; gender here is a binary label read from appearance, not anyone's gender identity.
- Identifying or tracking people: the model does not recognise who someone is, and must not be made to.
- Commercial use of a model trained on UTKFace: its licence allows non-commercial research only.

## Known limits
- UTKFace is imbalanced: most faces are 20-40 years old and White; children, people over 70 and the
  smaller race groups have fewer examples and larger errors (see the tables above).
- Labels are estimated from the photos by the data set's makers; errors of a few years are in the labels.
- Faces that are small, blurred, turned away, occluded or lit unlike the training photos do worse.
"""


def _table(rows: dict[str, dict[str, float]], columns: tuple[str, ...]) -> list[str]:
    lines = ["| group | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for group, values in rows.items():
        cells = [f"{values[c]:.3f}" if isinstance(values.get(c), float) else str(values.get(c, "")) for c in columns]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines


def shareable(config: str) -> str:
    """The training config (YAML) as a served page may show it: files by name, not by their path on the
    training machine, and no log folder."""
    cfg = yaml.safe_load(config) or {}
    cfg.pop("logdir", None)
    for section, key in (("data", "metadata"), ("model", "weights_path")):
        if cfg.get(section, {}).get(key):
            cfg[section][key] = Path(cfg[section][key]).name
    return yaml.safe_dump(cfg, sort_keys=False)


def render(meta: ModelMeta, test_report: dict[str, Any]) -> str:
    data, cal = meta.dataset, meta.calibration
    lines = [f"# Model card: age and gender ({meta.backbone}, {meta.age_head} age head)", ""]
    if meta.demo:
        lines += ["**DEMO MODEL** trained on generated sample data (not faces): its answers on photos mean nothing", ""]
    lines += [
        "## Data",
        # the metadata file by name: its folder is a path on the training machine, not for a served page
        f"- Data set: {data.name} (`{Path(data.metadata or '?').name}`), trained on split(s) "
        f"{', '.join(data.train_splits)}.",
        f"- Images: {data.n_train} train, {data.n_val} validation, {data.n_test} test.",
        "",
        "## Recipe",
        f"- Network: torchvision {meta.backbone} trunk, input {meta.image_size} px, two heads of width "
        f"{meta.head_width}; age head `{meta.age_head}`.",
        "- Config:",
        "",
        "```yaml",
        shareable(meta.config).rstrip(),
        "```",
        "",
        "## Metrics",
    ]
    for split, values in meta.metrics.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "n")
        lines.append(f"- {split} ({values['n']} faces): {shown}")
    lines += ["", "## Calibration"]
    if cal.split is not None:
        lines.append(
            f"- Gender: temperature {cal.gender_temperature} fitted on the {cal.split} split; "
            "expected calibration error (ECE) before and after is in the metrics above."
        )
        if cal.split == "test":
            lines.append("- The test split is also where it was fitted (val was trained on): test ECE is optimistic.")
        lines.append(
            f"- Age interval and P(age < {MINOR_AGE}): read from the age distribution, its temperature "
            f"{cal.age_temperature} fitted on the {cal.split} split."
            if meta.age_head == "distribution"
            else f"- Age interval and P(age < {MINOR_AGE}): from residual quantiles on the {cal.split} split."
        )
    else:
        lines.append("- None: this model had no held-out split to fit a calibration on.")
    if meta.int8 is not None:
        q = meta.int8
        crops = q.calibration_crops
        lines += [
            "",
            "## INT8 graph",
            f"- `{q.file}`: {q.format}; activation ranges (min-max) from {crops['n']} crops of split(s) "
            f"{', '.join(crops['splits'])} (seed {crops['seed']}).",
        ]
        if q.cost:
            lines.append("- Its cost, INT8 minus fp32 (the weights as trained):")
            lines += [f"  - {format_cost({split: diffs}, tuple(diffs))}" for split, diffs in q.cost.items()]
        runs, why = int8_verdict(meta)
        lines.append(f"- On CPU, `AGE_GENDER_RUNTIME=auto` {'runs it' if runs else 'serves the fp32 graph'}: {why}.")
    for name, title in (("age_group", "age group"), ("gender", "gender"), ("race", "race")):
        if f"by_{name}" in test_report:
            lines += ["", f"## Test metrics by {title}", ""]
            lines += _table(test_report[f"by_{name}"], ("n", "age_mae", "gender_acc", "interval_coverage"))
    return "\n".join(lines) + "\n\n" + LIMITS
