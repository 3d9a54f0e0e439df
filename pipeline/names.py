"""The names pngrow gives MLflow things: its run tags (all ``pngrow.``-prefixed) and its kinds of run.

Searches already stored read by these names: change none of the values.
"""

from __future__ import annotations

__all__ = ["ATTEMPTS", "CHOSEN_TRIAL_RUN", "COST", "DEVICE_WARNING", "ERROR", "FAMILY", "FINAL_STAGE_RUN",
           "FINGERPRINT", "GROWN_FROM_MODEL", "GROWN_FROM_RUN", "KIND", "Kind", "MODEL_URI", "ONNX",
           "OPTUNA_STUDY", "OPTUNA_TRIAL", "PREFIX", "QUALITY", "RAY_NODE", "REPORT_ERROR", "RUNG_WARNING",
           "SEARCH_ID", "SOURCE_RUN", "STAGE_INDEX", "STOPPED_EARLY", "TASK", "TASKS", "TASK_ORDER", "UPLOADED_DATA",
           "WORKER_NODE", "WORKER_PID", "fingerprint_tag", "is_pngrow_tag", "uploaded_data_tag"]

PREFIX = "pngrow."


class Kind:
    """The values of the :data:`KIND` tag."""

    SEARCH = "search"  # a whole search
    STAGE = "stage"  # one task's study: its trials, and the checkpoint of the chosen one
    TRIAL = "trial"  # one trial: a task grown into the parent stage's checkpoint
    BASE = "base"  # a released model a search grows into


# Lineage, on every run of a search.
KIND = PREFIX + "kind"
SEARCH_ID = PREFIX + "search_id"  # the search run's id
TASK = PREFIX + "task"  # a stage's or trial's task
STAGE_INDEX = PREFIX + "stage_index"  # the task's index in the model
TASK_ORDER = PREFIX + "task_order"  # comma-separated tasks up to this stage
GROWN_FROM_RUN = PREFIX + "grown_from_run"  # the stage (or base) run whose checkpoint this one started from
OPTUNA_STUDY = PREFIX + "optuna_study"
OPTUNA_TRIAL = PREFIX + "optuna_trial"
SMOKE_TEST = PREFIX + "smoke_test"  # "true" on every run of a ``--smoke-test`` search: a check, never promoted
# A search's.
TASKS = PREFIX + "tasks"  # comma-separated, every task of the model (also on a registered model version)
FAMILY = PREFIX + "family"
QUALITY = PREFIX + "quality"  # the quality objective
COST = PREFIX + "cost"  # the cost objective
ATTEMPTS = PREFIX + "attempts"  # how many drivers ran it (resumes + 1)
FINAL_STAGE_RUN = PREFIX + "final_stage_run"  # the stage run holding the final model
MODEL_URI = PREFIX + "model_uri"  # the logged pyfunc model
REPORT_ERROR = PREFIX + "report_error"  # why drawing the report failed
GROWN_FROM_MODEL = PREFIX + "grown_from_model"  # the released model the search grew (also on a base run)
SOURCE_RUN = PREFIX + "source_run"  # the run a registered model (or a base) came from
ONNX = PREFIX + "onnx"  # a registered version's ONNX export (``promote --onnx``): runs:/RUN/onnx/NAME/VERSION
UPLOADED_DATA = PREFIX + "uploaded_data"  # ``uploaded_data.<split>``: the local folder uploaded as data/<split>/
# A stage's.
CHOSEN_TRIAL_RUN = PREFIX + "chosen_trial_run"
# A trial's.
FINGERPRINT = PREFIX + "fingerprint"  # of the task as committed; on a search, ``fingerprint.<task>`` per task
WORKER_PID = PREFIX + "worker_pid"
WORKER_NODE = PREFIX + "worker_node"
RAY_NODE = PREFIX + "ray_node"  # the Ray node id the trial ran on
DEVICE_WARNING = PREFIX + "device_warning"  # why a trial trained on another device than Ray assigned it
STOPPED_EARLY = PREFIX + "stopped_early"  # why the stage's rung stopped the trial (its run ends KILLED)
RUNG_WARNING = PREFIX + "rung_warning"  # why a trial went on past the rung without its verdict (rung unreachable)
# Any run's.
ERROR = PREFIX + "error"  # the failure line of a failed run


def fingerprint_tag(task: str) -> str:
    """The search run's tag for ``task``'s committed fingerprint.

    >>> fingerprint_tag("x2")
    'pngrow.fingerprint.x2'
    """
    return f"{FINGERPRINT}.{task}"


def uploaded_data_tag(split: str) -> str:
    """The search run's tag naming the local ``split`` folder (train, eval) the driver uploaded for its trials.

    >>> uploaded_data_tag("train")
    'pngrow.uploaded_data.train'
    """
    return f"{UPLOADED_DATA}.{split}"


def is_pngrow_tag(name: str) -> bool:
    """Whether ``name`` is one of pngrow's tags (by its prefix)."""
    return name.startswith(PREFIX)
