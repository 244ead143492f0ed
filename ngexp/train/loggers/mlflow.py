"""MLflow: a run per ngexp run, in an experiment per run family (``pip install 'ngexp[mlflow]'``).

By default the tracking store is local, ``<output_root>/mlruns`` (MLflow's file store: no
server; ``mlflow ui --backend-store-uri <output_root>/mlruns`` shows it); ``tracking_uri``
points elsewhere (``sqlite:///mlflow.db``, ``http://host:5000``). Hyperparameters are logged as
params when the run starts, metrics under ngexp's names with their step, and the end as the run
status (``FINISHED``, ``FAILED``, ``KILLED`` for an interrupted run) with ``ngexp.status`` and
``ngexp.reason`` tags. A resumed run continues the same MLflow run (its id is kept in
``<run dir>/mlflow_run_id``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ngexp.errors import UserError
from ngexp.options import configurable
from ngexp.train.loggers.base import Logger, RunInfo

STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
#: MLflow's limit on the length of a param value.
PARAM_LENGTH = 500


@configurable("logger", "mlflow")
class MLflowLogger(Logger):
    """See the module docstring; ``experiment`` defaults to the run family's name."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("logger=mlflow needs MLflow: pip install 'ngexp[mlflow]'") from None
        self._client_class = MlflowClient
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, run: RunInfo) -> None:
        from mlflow.entities import Param

        uri = self.tracking_uri or (Path(run.output_root).resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self._client_class(tracking_uri=uri)
        name = self.experiment or run.name
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else self.client.create_experiment(name)
        id_file = run.run_dir / "mlflow_run_id"
        if run.resumed_step is not None and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        created = self.client.create_run(experiment_id, run_name=run.run_id,
                                         tags={"ngexp.group": run.group,
                                               "ngexp.run_dir": str(run.run_dir)})
        self.run_id = created.info.run_id
        id_file.write_text(self.run_id + "\n")
        params = [Param(key, str(value)[:PARAM_LENGTH]) for key, value in run.hparams.items()]
        for begin in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[begin:begin + 100])

    def log(self, step: int, epoch: float, time_s: float, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in metrics.items()])

    def finish(self, status: str, reason: str | None) -> None:
        self.client.set_tag(self.run_id, "ngexp.status", status)
        self.client.set_tag(self.run_id, "ngexp.reason", reason or "")
        self.client.set_terminated(self.run_id, STATUS[status])
