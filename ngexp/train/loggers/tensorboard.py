"""TensorBoard: every metric as a scalar under its ``train/``, ``test/``, ``optim/``... tag, and
the run's hyperparameters for the HParams tab from the moment it starts.

The HParams plugin reads three records (``tensorboard.plugins.hparams``): the experiment (which
hyperparameters and metrics exist), a session start (this run's values, grouped across seeds by
``group_name``) and a session end (its status). Writing the first two when the run starts and the
third when it ends -- ``STATUS_SUCCESS``, ``STATUS_FAILURE`` or, for an interrupted run,
``STATUS_RUNNING`` -- lists every run of a sweep, failed and interrupted ones included, with the
metrics read from the run's own scalars (no duplicate ``hparam/`` scalars).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ngexp.options import configurable
from ngexp.train.loggers.base import Logger, RunInfo, Scalar

#: HParams session status by run status.
STATUS = {"completed": "STATUS_SUCCESS", "failed": "STATUS_FAILURE",
          "interrupted": "STATUS_RUNNING"}


def hparams_summary(tag: str, data: Any) -> Any:
    """A ``Summary`` carrying HParams plugin data ``data`` (experiment / session start / end)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata

    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                        content=data.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def experiment_summaries(hparams: Mapping[str, Scalar], metrics: tuple[str, ...],
                         group: str) -> list[Any]:
    """The experiment and session-start summaries of a run."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos = []
    start = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):
            kind = api_pb2.DATA_TYPE_BOOL
            start.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            kind = api_pb2.DATA_TYPE_FLOAT64
            start.hparams[name].number_value = value
        else:
            kind = api_pb2.DATA_TYPE_STRING
            start.hparams[name].string_value = str(value)
        infos.append(api_pb2.HParamInfo(name=name, type=kind))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics])
    version = metadata.PLUGIN_DATA_VERSION
    return [hparams_summary(metadata.EXPERIMENT_TAG,
                            plugin_data_pb2.HParamsPluginData(experiment=experiment,
                                                              version=version)),
            hparams_summary(metadata.SESSION_START_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_start_info=start,
                                                              version=version))]


def session_end_summary(status: str) -> Any:
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(STATUS[status]),
                                         end_time_secs=time.time())
    return hparams_summary(metadata.SESSION_END_INFO_TAG,
                           plugin_data_pb2.HParamsPluginData(session_end_info=end,
                                                             version=metadata.PLUGIN_DATA_VERSION))


@configurable("logger", "tensorboard")
class TensorBoardLogger(Logger):
    """Event files in ``<run dir>/tb`` (``tensorboard --logdir <output_root>``); on resume,
    events after the checkpoint's step are purged."""

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=run.resumed_step)
        for summary in experiment_summaries(run.hparams, run.metrics, run.group):
            self.writer._get_file_writer().add_summary(summary)
        self.writer.flush()

    def log(self, step: int, epoch: float, time: float, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, status: str, reason: str | None) -> None:
        self.writer._get_file_writer().add_summary(session_end_summary(status))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
