"""TensorBoard: every metric as a scalar under its ``train/``, ``test/``, ``optim/``... tag, and
the run's hyperparameters and status for the HParams tab from the moment it starts.

The HParams plugin (``tensorboard.plugins.hparams``) reads a session start record (this run's
values, its seeds grouped by ``group_name``) and a session end record (its status) per run.
No experiment record is written: TensorBoard then builds the experiment from the session
starts of every run it sees (``backend_context._compute_experiment_from_runs``), so a sweep
over ``optimizer=sgd,kfac`` shows the union of their keys (K-FAC's ``optimizer.damping`` too),
the keys whose values differ first, and its metrics from the runs' scalar tags.

TensorBoard keeps the *first* record of a tag per run, reading a run's event files in name
order, so the records that change (the ``status`` column: ``running``, ``completed``,
``failed(nan at step 3)``...; the session end) live in their own file that sorts first,
``tb/events.out.tfevents.0000000000.ngexp-hparams``, rewritten when a session starts and ends
(a TensorBoard already running sees the end status through the ordinary event file, the new
``status`` text after a reload). Seeds of one configuration share the group name: the choices
of the run's command line (``optimizer=kfac optimizer.lr=0.1``) and its hash.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ngexp.options import configurable
from ngexp.train.loggers.base import Logger, RunInfo, Scalar

#: HParams session status by run status.
STATUS = {"completed": "STATUS_SUCCESS", "failed": "STATUS_FAILURE",
          "interrupted": "STATUS_RUNNING"}
#: The event file holding the run's HParams records; sorts before the writer's files.
HPARAMS_FILE = "events.out.tfevents.0000000000.ngexp-hparams"


def hparams_summary(tag: str, data: Any) -> Any:
    """A ``Summary`` carrying HParams plugin data ``data`` (session start / end)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata

    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                        content=data.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def session_start_summary(hparams: Mapping[str, Scalar], group: str, started: float) -> Any:
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=started)
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = str(value)
    return hparams_summary(metadata.SESSION_START_INFO_TAG,
                           plugin_data_pb2.HParamsPluginData(
                               session_start_info=start, version=metadata.PLUGIN_DATA_VERSION))


def session_end_summary(status: str) -> Any:
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(STATUS[status]),
                                         end_time_secs=time.time())
    return hparams_summary(metadata.SESSION_END_INFO_TAG,
                           plugin_data_pb2.HParamsPluginData(session_end_info=end,
                                                             version=metadata.PLUGIN_DATA_VERSION))


def write_hparams_file(folder: Path, summaries: list[Any]) -> None:
    """Replace ``folder/HPARAMS_FILE`` by an event file holding ``summaries`` (atomically:
    the temporary name is not an event file's)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".ngexp-hparams.tmp"
    now = time.time()
    with tmp.open("wb") as stream:
        records = RecordWriter(stream)
        records.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        for summary in summaries:
            records.write(Event(wall_time=now, summary=summary).SerializeToString())
    os.replace(tmp, folder / HPARAMS_FILE)


@configurable("logger", "tensorboard")
class TensorBoardLogger(Logger):
    """Event files in ``<run dir>/tb`` (``tensorboard --logdir <output_root>``); on resume,
    events after the checkpoint's step are purged."""

    def __init__(self) -> None:
        self.writer: Any = None
        self.run: RunInfo | None = None
        self.started = 0.0

    def _write_hparams(self, status: str, *end: Any) -> None:
        assert self.run is not None
        hparams = {**self.run.hparams, "status": status}
        group = f"{self.run.label or self.run.name} · {self.run.group.rpartition('/')[2]}"
        write_hparams_file(self.run.run_dir / "tb",
                           [session_start_summary(hparams, group, self.started), *end])

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.started = run, time.time()
        self.writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=run.resumed_step)
        self._write_hparams("running")

    def log(self, step: int, epoch: float, time: float, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, status: str, reason: str | None) -> None:
        end = session_end_summary(status)
        self._write_hparams(f"{status}({reason})" if reason else status, end)
        self.writer._get_file_writer().add_summary(end)  # seen by a running TensorBoard
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
