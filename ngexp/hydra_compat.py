"""The places where ngexp calls Hydra differently on Hydra 1.3 and 1.4, so that either runs
without a warning (``make test-hydra14``, tests/test_hydra_versions.py).

- ``version_base``: Hydra 1.3 warns when it is left out ("not specified ... will assume
  defaults for version 1.1"); Hydra 1.4 warns whenever it is given, ``None`` included ("deprecated
  and will be removed in Hydra 1.5"), and only records it: 1.4 has one behaviour, 1.3's with
  ``version_base="1.3"``. :data:`VERSION_BASE` is the keyword argument to pass to
  ``hydra.main``, ``initialize_config_dir`` and ``initialize``: ``version_base="1.3"`` on 1.3,
  nothing on 1.4 and later.
- ``ConfigStore.store``: Hydra 1.4 warns when a name is stored a second time without
  ``replace=`` ("will raise an error in Hydra 1.5"); Hydra 1.3 has no ``replace=`` (a
  ``TypeError``) and replaces silently. :class:`Store` stores ngexp's configs with
  ``provider="ngexp"`` and replaces an earlier entry of ngexp's explicitly; a collision with
  somebody else's entry still warns on 1.4.
- Hydra's plugins: each release line of ``hydra-optuna-sweeper`` works with its own Hydra line
  only, but 1.3.0 declares ``hydra-core>=1.1`` without an upper bound, so upgrading hydra-core
  alone keeps it, and its sweep fails in the first trial (on 1.4 the sweeper's ``sampler`` node
  is no longer instantiated for it: ``Key 'infer_relative_search_space' not in
  'SamplerConfig'``). :func:`plugin_mismatch` names the plugin to upgrade.
- ``instantiate``: Hydra 1.4 warns on every ``_target_`` it builds without an execution
  whitelist (an error in 1.5); 1.3 has none. :func:`execution_whitelist` is the keyword.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

import hydra
import hydra.utils
from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType


def version_tuple(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string (``1.4.0rc3`` -> ``(1, 4)``)."""
    found = re.match(r"(\d+)\.(\d+)", text)
    if found is None:
        raise ValueError(f"not a version: {text!r}")
    return int(found.group(1)), int(found.group(2))


#: Hydra's ``(major, minor)``.
HYDRA_VERSION = version_tuple(hydra.__version__)
#: The ``version_base`` keyword argument for ``hydra.main`` / ``initialize_config_dir``:
#: ``f(..., **VERSION_BASE)``.
VERSION_BASE: dict[str, str] = {} if HYDRA_VERSION >= (1, 4) else {"version_base": "1.3"}
#: Whether ``ConfigStore.store`` takes ``replace=`` (Hydra 1.4 and later).
STORE_TAKES_REPLACE = "replace" in inspect.signature(ConfigStore.store).parameters
#: The ``provider`` of every config ngexp stores.
PROVIDER = "ngexp"


class Store:
    """``ConfigStore.instance()`` for ngexp's own configs: ``store()`` takes the same arguments
    as ``ConfigStore.store`` (less ``provider``), and storing a name again (``register_all`` runs
    once per entry point: option validation, the Hydra app, the help, the identity check)
    replaces ngexp's earlier entry without a warning on Hydra 1.3 and 1.4."""

    def __init__(self) -> None:
        self.config_store = ConfigStore.instance()

    def store(self, name: str, node: Any, group: str | None = None,
              package: str | None = None) -> None:
        path = f"{group}/{name}" if group else name
        if not path.endswith(".yaml"):
            path += ".yaml"
        replace = {}
        if STORE_TAKES_REPLACE and self.config_store.get_type(path) is ObjectType.CONFIG:
            if self.config_store.load(path).provider == PROVIDER:
                replace = {"replace": True}
        self.config_store.store(name=name, node=node, group=group, package=package,
                                provider=PROVIDER, **replace)


#: Whether ``hydra.utils.instantiate`` takes an execution whitelist (Hydra 1.4 and later).
HAS_EXECUTION_WHITELIST = "_execution_whitelist_" in inspect.signature(
    hydra.utils.instantiate).parameters


def execution_whitelist(allowed: Iterable[str]) -> dict[str, Any]:
    """The keyword for ``hydra.utils.instantiate(node, **execution_whitelist(names))`` that lets
    it build only ``allowed`` (exact ``module.QualName`` strings as a config spells them, or
    ``package.*``), checked by Hydra on every nested ``_target_`` and on callable results:
    ``{"_execution_whitelist_": (...)}`` on Hydra 1.4; nothing on 1.3, which has no such check
    and would hand the key on to the target as an argument. ngexp's own check comes first
    (:func:`ngexp.targets.instantiate`); this one is Hydra's."""
    return {"_execution_whitelist_": tuple(allowed)} if HAS_EXECUTION_WHITELIST else {}


#: Hydra plugins released in step with Hydra: distribution -> the Python package it installs.
LOCKSTEP_PLUGINS = {"hydra-optuna-sweeper": "hydra_plugins.hydra_optuna_sweeper"}


def plugin_mismatch(target: Any) -> str | None:
    """Why the Hydra plugin whose class is ``target`` (a ``hydra.sweeper._target_``) cannot run
    under this Hydra, ``None`` when it can (or is not one of :data:`LOCKSTEP_PLUGINS`)."""
    from importlib import metadata

    for distribution, package in LOCKSTEP_PLUGINS.items():
        if not str(target).startswith(package + "."):
            continue
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None
        if (HYDRA_VERSION >= (1, 4)) != (version_tuple(version) >= (1, 4)):
            wanted = ">=1.4.0rc1,<1.5" if HYDRA_VERSION >= (1, 4) else "<1.4"
            return (f"{distribution} {version} does not work with hydra-core "
                    f"{hydra.__version__}: pip install --pre '{distribution}{wanted}'")
    return None
