"""`python -m training <command>`: synth, metadata, fit, export, tune, production, evaluate, demo.

Bad input ends with one line on stderr and exit code 2; no half-written files are left behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.artifact import INTERVAL_LEVEL
from models.cli import Debug, OneLineParser, exit_code, level
from models.runtime import RUNTIMES, format_cost

RESUME_HELP = (
    "continue the config's latest run (logdir/name/version_N) from its last.ckpt, written every epoch and "
    "on SIGTERM / SIGINT (a new run where there is none); refused if the config changed"
)
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def cmd_synth(args: argparse.Namespace) -> None:
    from training.synth import write_sample_dataset

    out = write_sample_dataset(args.out, args.n, args.seed)
    print(f"wrote {args.n} sample images to {out}")


def cmd_metadata(args: argparse.Namespace) -> None:
    from training.utkface import SPLITS, build_metadata

    df, report = build_metadata(
        args.data_dir, args.out, balance=args.balance, fractions=tuple(args.split), seed=args.seed
    )
    for line in report.lines():
        print(line)
    counts = df.split.value_counts()
    print(f"wrote {args.out}: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS))


def _fit(config: Path, overrides: list[str], export: bool, resume: bool = False) -> None:
    from training.config import load_config
    from training.fit import fit

    checkpoint = fit(load_config(config, overrides), resume=resume)
    if checkpoint is None:  # another process than rank 0 of a multi-process run: rank 0 reports and exports
        return
    print(f"best checkpoint: {checkpoint}")
    if export:
        _export(checkpoint)


def _export(checkpoint: Path, name: str | None = None) -> None:
    from models.artifact import MODEL_NAME
    from training.export import export

    print(f"saved model {export(checkpoint, name or MODEL_NAME)} to the BentoML store")


def cmd_fit(args: argparse.Namespace) -> None:
    overrides = args.overrides + (["model.pretrained=false"] if args.no_pretrained else [])
    _fit(args.config, overrides, args.export, args.resume)


def cmd_export(args: argparse.Namespace) -> None:
    _export(args.checkpoint, args.name)


def cmd_tune(args: argparse.Namespace) -> None:
    from training.config import load_config
    from training.tune import load_space, tune

    storage = args.storage or f"sqlite:///{Path(args.logdir, args.study + '.db').resolve()}"
    base = load_config(args.config, args.overrides + [f"logdir={args.logdir}"])
    Path(args.logdir).mkdir(parents=True, exist_ok=True)
    out = args.out or Path("configs") / f"{args.study}_best.yaml"
    info = tune(base, load_space(args.space), args.study, storage, args.n_trials, args.workers, out)
    print(f"best trial {info['trial']} of study {args.study!r}: score {info['score']:.4f} (storage {storage})")
    for name, value in info["importances"].items():
        print(f"  importance {name}: {value}")
    print(f"wrote {out}; train it with `python -m training production --config {out}`")


def cmd_production(args: argparse.Namespace) -> None:
    from training.production import production

    tag = production(args.config, args.overrides, args.resume)
    if tag is not None:  # None: not rank 0 of a multi-process run
        print(f"saved model {tag} to the BentoML store")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate

    report = evaluate(
        args.model, args.metadata, args.out, args.split, args.tta, args.batch_size, args.level, args.runtime
    )
    o = report["overall"]
    print(f"runtime {report['runtime']}: {report['runtime_reason']}")
    print(
        f"{o['n']} images: age MAE {o['age_mae']:.2f}, RMSE {o['age_rmse']:.2f}, MSE {o['age_mse']:.1f}, "
        f"CS@5 {o['cs5']:.3f}; gender accuracy {o['gender_acc']:.3f}, "
        f"ECE {o['gender_ece_uncalibrated']:.3f} -> {o['gender_ece']:.3f} calibrated"
    )
    if "interval_coverage" in o:
        print(
            f"{o['interval_level']:.0%} age interval coverage {o['interval_coverage']:.3f}; "
            f"P(under 18) ROC AUC {o.get('minor_auc', float('nan')):.3f}"
        )
    else:
        print(
            "no age intervals: no calibration in this model (a checkpoint: `export` it; a regression model "
            "exported before residuals were measured: export it again)"
        )
    shown = ("age_mae", "gender_acc", "gender_ece")
    if report.get("int8_cost"):
        print("INT8 minus fp32 graph now, " + format_cost({args.split: report["int8_cost"]}, shown))
    if report["int8_cost_at_export"]:
        print("INT8 minus fp32 weights at export, " + format_cost(report["int8_cost_at_export"], shown))
    print(f"wrote {args.out}/report.json, predictions.csv and plots")


def cmd_demo(args: argparse.Namespace) -> None:
    """Sample data -> metadata -> a small model -> the store: what `make serve` runs on a fresh clone."""
    import bentoml

    from models.artifact import MODEL_NAME
    from training.synth import write_sample_dataset
    from training.utkface import build_metadata

    if args.if_missing:
        try:
            print(f"model {bentoml.models.get(MODEL_NAME)} is in the store; not training a demo model")
            return
        except bentoml.exceptions.NotFound:
            pass  # an empty store (bentoml.models.list raises here too): train the demo model
    print("training a DEMO model on generated sample data: its predictions on real photos mean nothing")
    data, metadata = args.workdir / "data", args.workdir / "metadata.csv"
    if not data.exists():
        write_sample_dataset(data, args.n, seed=0)
    build_metadata(data, metadata)
    overrides = [f"data.metadata={metadata}", f"logdir={args.workdir / 'runs'}"]
    _fit(DEMO_CONFIG, overrides + ([f"trainer.max_epochs={args.epochs}"] if args.epochs else []), export=True)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    s = sub.add_parser("synth", help="write generated sample images in UTKFace's file-name format")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("metadata", help="scan UTKFace images into a balanced, split metadata CSV")
    s.add_argument("--data-dir", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--no-balance", dest="balance", action="store_false", help="keep every image")
    s.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    s.add_argument("--seed", type=int, default=42)
    s.set_defaults(func=cmd_metadata)

    s = sub.add_parser("fit", help="train from a YAML config plus section.key=value overrides")
    s.add_argument("--config", type=Path, required=True)
    s.add_argument("overrides", nargs="*", help="e.g. model.backbone=resnet18 trainer.max_epochs=5")
    s.add_argument("--no-pretrained", action="store_true", help="train from scratch (no ImageNet weights)")
    s.add_argument("--export", action="store_true", help="export the best checkpoint to the model store")
    s.add_argument("--resume", action="store_true", help=RESUME_HELP)
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("export", help="save a checkpoint into the BentoML model store")
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--name", default=None, help="model name in the store (default age_gender)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("tune", help="Optuna study over the config; writes the best config")
    s.add_argument("--config", type=Path, required=True, help="base config (data.metadata, trainer settings)")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--space", type=Path, default=Path("configs/tune_space.yaml"))
    s.add_argument("--study", default="age_gender")
    s.add_argument("--storage", default=None, help="Optuna RDB URL (default: sqlite file in --logdir)")
    s.add_argument("--n-trials", type=int, default=30, help="finished trials the study should reach")
    s.add_argument("--workers", type=int, default=1, help="local worker processes on the study")
    s.add_argument("--logdir", type=Path, default=Path("runs/tune"))
    s.add_argument("--out", type=Path, default=None, help="best config (default configs/<study>_best.yaml)")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("production", help="retrain a config on train+val, test, export to the store")
    s.add_argument("--config", type=Path, required=True)
    s.add_argument("overrides", nargs="*")
    s.add_argument("--resume", action="store_true", help=RESUME_HELP)
    s.set_defaults(func=cmd_production)

    s = sub.add_parser("evaluate", help="metrics by age, gender and race, with plots")
    s.add_argument("--model", required=True, help="store tag (age_gender:TAG) or checkpoint file")
    s.add_argument("--metadata", type=Path, required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--tta", action="store_true", help="average with the mirrored image")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--level", type=level, default=INTERVAL_LEVEL, help=f"age interval level (default {INTERVAL_LEVEL})")
    s.add_argument(
        "--runtime",
        default="auto",
        choices=RUNTIMES,
        help="a stored model's runtime (models/runtime.py); when the INT8 graph runs, its cost against the fp32 "
        "graph is measured too (checkpoints: torch)",
    )
    s.add_argument("--out", type=Path, default=Path("reports/latest"))
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("demo", help="train and export a demo model on generated sample data")
    s.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    s.add_argument("--n", type=int, default=1500, help="sample images to generate")
    s.add_argument("--epochs", type=int, default=None, help="override configs/demo.yaml's max_epochs")
    s.add_argument("--if-missing", action="store_true", help="do nothing if the store has an age_gender model")
    s.set_defaults(func=cmd_demo)
    for command in (p, *sub.choices.values()):  # before or after the command's name
        command.add_argument("--debug", action=Debug)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return exit_code(lambda: args.func(args))
