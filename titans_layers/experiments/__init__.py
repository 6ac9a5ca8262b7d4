"""Experiments that show what a Titans model's memory learns (SPEC §5).

``python -m titans_layers.experiments TASK [options]`` (console script ``titans-experiments``)
trains small models on a task and writes a report (``results.json``, ``report.md``, PNG plots).
One job per module:

- :mod:`~titans_layers.experiments.tasks`: the data (``mqar``, ``niah``, ``lm``);
- :mod:`~titans_layers.experiments.models`: the model zoo and parameter matching;
- :mod:`~titans_layers.experiments.training`: the training loop;
- :mod:`~titans_layers.experiments.evaluation`: the per-task metrics;
- :mod:`~titans_layers.experiments.gate_stats`: the memory layers' gate statistics;
- :mod:`~titans_layers.experiments.runner`: the grid of runs, in worker processes;
- :mod:`~titans_layers.experiments.reports`, :mod:`~titans_layers.experiments.plots`: the report;
- :mod:`~titans_layers.experiments.cli`: the command line.
"""

import warnings

# fla warns at import on a machine without a GPU; the experiments say where they run themselves
warnings.filterwarnings("ignore", message="Triton is not supported on current platform")

from titans_layers.experiments.models import MODEL_NAMES, build_model  # noqa: E402
from titans_layers.experiments.runner import RunSpec, plan, run_all, run_one  # noqa: E402
from titans_layers.experiments.tasks import MQAR, NIAH, ByteLM, make_task  # noqa: E402
from titans_layers.experiments.training import TrainConfig, train  # noqa: E402

__all__ = ["ByteLM", "MODEL_NAMES", "MQAR", "NIAH", "RunSpec", "TrainConfig", "build_model", "make_task", "plan",
           "run_all", "run_one", "train"]
