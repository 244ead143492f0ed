"""The HParams tab of a sweep, read by TensorBoard's own code (its multiplexer, data provider and
the HParams plugin's request handlers): the union of every run's keys (K-FAC's
``optimizer.damping`` next to SGD's), the keys that vary first, a status column with the
failure reason, readable group names."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import ngexp


def hparams_tab(logdir: Path) -> tuple[object, object]:
    """(experiment, session groups) as TensorBoard's HParams plugin serves them."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import (
        api_pb2,
        backend_context,
        get_experiment,
        list_session_groups,
    )

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer, data_provider=provider))
    request = context.RequestContext()
    experiment = get_experiment.Handler(request, backend, "", api_pb2.GetExperimentRequest()).run()
    groups = list_session_groups.Handler(request, backend, "", api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=[
            api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE,
            api_pb2.STATUS_RUNNING])).run()
    return experiment, groups


def test_a_sgd_kfac_sweep_shows_every_key_status_and_readable_groups(tmp_path: Path) -> None:
    ngexp("train", "-m", "optimizer=sgd,kfac", "optimizer.lr=0.01,1e5", "data=synthetic",
          "trainer.max_steps=6", "trainer.log_every=3", f"output_root={tmp_path}")
    experiment, groups = hparams_tab(tmp_path)
    infos = list(experiment.hparam_infos)
    names = [info.name for info in infos]
    for key in ("optimizer.damping", "optimizer.stat_decay", "optimizer.inv_update_freq",
                "optimizer.kl_clip", "optimizer.fisher_type", "optimizer.lr", "seed", "status"):
        assert key in names, key
    varying = [info.name for info in infos if info.differs]
    assert {"choice/optimizer", "optimizer.lr", "status"} <= set(varying)
    assert "choice/data" not in varying and "seed" not in varying
    assert names[:len(varying)] == sorted(varying)  # the varying keys come first
    assert "test/acc" in {info.name.tag for info in experiment.metric_infos}

    assert len(groups.session_groups) == 4
    by_name = {group.name: group for group in groups.session_groups}
    failed = by_name[next(name for name in by_name
                          if name.startswith("optimizer=sgd optimizer.lr=100000.0 "))]
    assert failed.sessions[0].status == 2  # STATUS_FAILURE
    status = failed.hparams["status"].string_value
    assert status.startswith("failed(nan at step "), status
    done = by_name[next(name for name in by_name
                        if name.startswith("optimizer=kfac optimizer.lr=0.01 "))]
    assert done.sessions[0].status == 1 and done.hparams["status"].string_value == "completed"
    assert done.hparams["optimizer.damping"].number_value > 0


def test_a_resumed_run_shows_its_last_status(tmp_path: Path) -> None:
    """TensorBoard keeps the first record of a tag per run: the HParams file is rewritten, so a
    run that was interrupted and then completed shows ``completed``."""
    args = ("train", "data=synthetic", "trainer.max_steps=4", f"output_root={tmp_path}")
    ngexp(*args)
    (summary,) = tmp_path.rglob("summary.json")
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted"}))
    ngexp(*args)  # resumes: a second session in the same run
    _, groups = hparams_tab(tmp_path)
    (group,) = groups.session_groups
    assert group.hparams["status"].string_value == "completed"
    assert group.name.startswith("data=synthetic trainer.max_steps=4 · ")
