"""`tune`: an Optuna study over the training config, resumable and shareable between machines.

Trials are scored by a number that does not depend on the tuned loss weights (the combined loss does):
    score = val age MAE / MAE of predicting the mean training age  +  val gender error / 0.5
so 2.0 is a model with no skill and 0.0 a perfect one. Each trial trains with `fit` (its own TensorBoard
run under logdir/<study>/trial_N), reports the score every epoch to Optuna's median pruner and records
the epoch where its score was best, which `production` then trains for.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import lightning as L
import optuna
import yaml
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from models.errors import Interrupted, UserError
from training.atomic import atomic_path
from training.config import changed_keys, flatten, set_key, validate
from training.fit import fit
from training.utkface import read_metadata

SCORE = "val/score"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
IDENTITY = "tune_identity"  # study user attr: what its trials are comparable under (set when it is created)
# where and how verbosely a trial runs, not what it computes: may differ between the workers of one study
PLACEMENT = {
    "name",
    "logdir",
    "data.num_workers",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
}


class Score(L.Callback):
    """Logs SCORE after each validation and remembers the best epoch."""

    def __init__(self, baseline_mae: float) -> None:
        self.baseline_mae = baseline_mae
        self.best: tuple[float, int] = (float("inf"), -1)

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        score = float(m["val/age_mae"]) / self.baseline_mae + (1 - float(m["val/gender_acc"])) / 0.5
        module.log(SCORE, score)
        self.best = min(self.best, (score, trainer.current_epoch))


def load_space(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space file {path} does not exist; see configs/tune_space.yaml")
    space = yaml.safe_load(path.read_text()) or {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise UserError(f"search space entry {key!r} needs 'choices' or 'low' and 'high'")
    return space


def suggest(trial: optuna.Trial, space: dict) -> dict:
    params = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
    return params


def with_params(base: dict, params: dict) -> dict:
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        set_key(cfg, key, value)
    return validate(cfg)


def objective(base: dict, space: dict, study_name: str, baseline_mae: float):
    def run(trial: optuna.Trial) -> float:
        cfg = with_params(base, suggest(trial, space))
        cfg["name"] = f"{study_name}/trial_{trial.number}"
        cfg["trainer"] = {**cfg["trainer"], "enable_checkpointing": True}
        score = Score(baseline_mae)
        trial.set_user_attr("pid", os.getpid())
        try:
            fit(cfg, callbacks=[score, PyTorchLightningPruningCallback(trial, monitor=SCORE)])
        except Interrupted as exc:  # SIGTERM / SIGINT: the trial fails, marked; `tune` again runs the next one
            trial.set_user_attr("interrupted", True)
            raise Interrupted(
                f"trial {trial.number} of study {study_name!r} stopped by a signal and marked interrupted; run the "
                "same tune command again to go on with the next trial",
                exc.code,
            ) from exc
        trial.set_user_attr("best_epoch", score.best[1])
        return score.best[0]

    return run


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def identity(base: dict, space: dict) -> dict:
    """The base config (less PLACEMENT; the metadata file by content, not path) and the search space,
    with a SHA-256 of each: trials of one study are only comparable if these are the same."""
    config = {k: v for k, v in flatten(base).items() if k not in PLACEMENT}
    config["data.metadata"] = "sha256:" + hashlib.sha256(Path(base["data"]["metadata"]).read_bytes()).hexdigest()
    config = json.loads(json.dumps(config, default=str))  # as the storage gives it back
    space = json.loads(json.dumps(space, default=str))
    return {
        "base_config_sha256": _sha256(config),
        "search_space_sha256": _sha256(space),
        "base_config": config,
        "search_space": space,
    }


def check_identity(study: optuna.Study, base: dict, space: dict) -> None:
    """Record what a new study runs under; refuse to resume one whose base config or search space changed."""
    current = identity(base, space)
    if IDENTITY not in study.user_attrs:
        if study.get_trials(deepcopy=False):
            print(
                f"warning: study {study.study_name!r} predates recording its config; cannot check it", file=sys.stderr
            )
        study.set_user_attr(IDENTITY, current)
    stored = study.user_attrs[IDENTITY]  # read back: of two workers creating it at once with different configs,
    # the one whose attr was overwritten refuses
    problems = []
    for what, key, data in (
        ("base config", "base_config_sha256", "base_config"),
        ("search space", "search_space_sha256", "search_space"),
    ):
        if stored.get(key) != current[key]:
            problems.append(f"{what} (changed: {', '.join(changed_keys(stored.get(data, {}), current[data]))[:200]})")
    if problems:
        raise UserError(
            f"study {study.study_name!r} was run with another {' and '.join(problems)}: its trials would not "
            f"compare with new ones; start a new study with a new --study name (e.g. --study "
            f"{study.study_name}_2), or undo the change to resume it"
        )


def open_study(name: str, storage: str) -> optuna.Study:
    try:
        return optuna.create_study(
            study_name=name,
            storage=storage,
            direction="minimize",
            load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        )
    except Exception as exc:
        raise UserError(
            f"cannot open Optuna storage {storage!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "use sqlite:///path/to/study.db or postgresql://user:password@host/database"
        ) from exc


def _worker(base: dict, space: dict, name: str, storage: str, n_trials: int, baseline_mae: float) -> None:
    study = open_study(name, storage)
    if len(study.get_trials(deepcopy=False, states=DONE)) >= n_trials:
        return
    run = objective(base, space, name, baseline_mae)
    study.optimize(run, callbacks=[MaxTrialsCallback(n_trials, states=DONE)], catch=())


def best_config(study: optuna.Study, base: dict) -> tuple[dict, dict]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise UserError(f"study {study.study_name!r} has no complete trial yet; run `training tune` first")
    best = study.best_trial
    cfg = with_params(base, best.params)
    cfg["trainer"] = {**cfg["trainer"], "max_epochs": best.user_attrs["best_epoch"] + 1}
    importances = {}
    if len(done) >= 2:
        importances = {k: round(v, 4) for k, v in optuna.importance.get_param_importances(study).items()}
    info = {"study": study.study_name, "trial": best.number, "score": best.value, "importances": importances}
    return cfg, info


def tune(base: dict, space: dict, name: str, storage: str, n_trials: int, workers: int, out: Path) -> dict:
    frame = read_metadata(base["data"]["metadata"])
    val, train_mean = frame[frame.split == "val"], frame[frame.split == "train"].age.mean()
    if val.empty:
        raise UserError("the metadata has no validation split; tuning needs one")
    baseline_mae = float((val.age - train_mean).abs().mean())
    # fail early, in this process, on a bad storage URL or a changed config
    check_identity(open_study(name, storage), base, space)
    args = (base, space, name, storage, n_trials, baseline_mae)
    if workers == 1:
        _worker(*args)
    else:
        procs = [mp.get_context("spawn").Process(target=_worker, args=args) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise UserError("a tuning worker failed; see its output above")
    cfg, info = best_config(open_study(name, storage), base)
    header = "".join(f"# {line}\n" for line in yaml.safe_dump(info, sort_keys=False).splitlines())
    with atomic_path(out) as tmp:
        tmp.write_text(
            f"# best trial of study {name!r} ({storage}); train it with `training production`\n"
            + header
            + yaml.safe_dump(cfg, sort_keys=False)
        )
    return info
