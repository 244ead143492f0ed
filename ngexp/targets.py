"""Trusted targets: the only callables a config may name in a ``_target_``.

A ``_target_`` is code: instantiating ``{_target_: builtins.exec, _args_: [...]}`` runs it, and
a config comes from places a user does not always read line by line (a preset, an
``+experiment`` file, a colleague's ``config.yaml``, a sweep's command line). ngexp therefore
instantiates only

- the targets of registered schemas (:data:`ngexp.options.REGISTRY`: ngexp's own and the
  plugins', :mod:`ngexp.plugins`), and
- the callables registered with :func:`ngexp.options.nested_target` (the schedules a setting
  may take, e.g. ``optimizer.damping={_target_: ngexp.optim.hyperparams.Exponential, ...}``).

A node composed from a schema must name that schema's own target, so ``model._target_=X``
cannot swap the class built with ``model=mlp``'s settings. The check compares names; nothing
is imported to perform it. :func:`instantiate` is the one door through which ngexp builds
objects from configs, and it checks every ``_target_`` of the node first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ngexp import plugins
from ngexp.errors import OptionError, UserError
from ngexp.hydra_compat import execution_whitelist
from ngexp.options import NESTED_TARGETS, REGISTRY, full_name

#: How a user registers a target of theirs: a schema (an option), or a setting's schedule.
HOW_TO_REGISTER = {
    False: "register yours with @configurable in a plugin (docs/extending.md) and choose it "
           "by its option name",
    True: "register yours with @nested_target in a plugin (docs/extending.md)",
}


def schema_target(schema: type) -> str | None:
    """The ``_target_`` a schema dataclass builds (``None``: a schema without one)."""
    for item in dataclasses.fields(schema):
        if item.name == "_target_" and isinstance(item.default, str):
            return item.default
    return None


def trusted_targets() -> dict[str, str]:
    """Every trusted target by name -> what registered it (``optimizer/kfac``, ``nested``);
    the plugins are loaded first."""
    plugins.load()
    found = {name: "nested" for name in NESTED_TARGETS}
    for group, specs in REGISTRY.items():
        for name, spec in specs.items():
            target = (schema_target(spec.dataclass_schema) if spec.dataclass_schema is not None
                      else full_name(spec.target))
            if target is not None:
                found[target] = f"{group}/{name}"
    return found


def hydra_allowed() -> list[str]:
    """What Hydra 1.4's own execution check may build (:func:`ngexp.hydra_compat.
    execution_whitelist`): the trusted targets and, as ``module.*``, everything of their
    modules, since Hydra also checks the callables they return (an lr schedule's closure)."""
    names = trusted_targets()
    return sorted({*names, *(f"{name.rsplit('.', 1)[0]}.*" for name in names)})


def untrusted(key: str, target: Any, trusted: Mapping[str, str], nested: bool) -> str | None:
    """Why the ``_target_`` at ``key`` (``nested``: in a setting, not a group's node) may not
    be instantiated, ``None`` when it may."""
    if isinstance(target, str) and target in trusted:
        return None
    return (f"{key}={target!r} is not a trusted target: ngexp instantiates only its own "
            f"classes and those of registered plugins; {HOW_TO_REGISTER[nested]}")


def check_targets(node: Any, path: str = "") -> None:
    """Raise :class:`OptionError` (one line) for the first ``_target_`` under ``node`` (a
    config or a plain container; Hydra's own ``hydra`` node is left to Hydra) that is not
    trusted, or that differs from the target of the schema its node was composed from."""
    trusted = trusted_targets()
    for key, holder, target in target_nodes(node, path):
        schema = OmegaConf.get_type(holder) if isinstance(holder, DictConfig) else None
        own = schema_target(schema) if dataclasses.is_dataclass(schema) else None
        problem = untrusted(key, target, trusted, nested=own is None and key.count(".") > 1)
        if problem is None and own is not None and target != own:
            problem = f"{key}={target!r} cannot replace {own}, which its schema builds"
            if "/" in trusted[target]:
                problem += f": choose {trusted[target].replace('/', '=', 1)} instead"
        if problem is not None:
            raise OptionError(problem)


#: What Hydra's own config (``hydra.launcher``, ``hydra.sweeper``) may build: Hydra's classes,
#: its installed plugins' and the samplers and pruners of Optuna's sweeper.
HYDRA_TARGETS = ("hydra.", "hydra_plugins.", "optuna.samplers.", "optuna.pruners.")


def check_hydra_targets(hydra: Any) -> None:
    """Raise :class:`OptionError` for a ``_target_`` of Hydra's node (``hydra.launcher``,
    ``hydra.sweeper``: Hydra builds them itself) outside :data:`HYDRA_TARGETS`."""
    for key, _, target in target_nodes(hydra, "hydra"):
        if not (isinstance(target, str) and target.startswith(HYDRA_TARGETS)):
            raise OptionError(f"{key}={target!r} is not one of Hydra's launchers, sweepers or "
                              f"their parts: choose them as groups (hydra/launcher=parallel, "
                              f"hydra/sweeper=optuna)")


def target_nodes(node: Any, path: str) -> list[tuple[str, Any, Any]]:
    """``(dotted key of _target_, its node, its value)`` of every node under ``node``."""
    found = []
    if isinstance(node, (DictConfig, Mapping)):
        keys = list(node.keys())
        if "_target_" in keys:
            found.append((f"{path}._target_" if path else "_target_", node, node["_target_"]))
        for key in keys:
            if key == "_target_" or (key == "hydra" and not path):
                continue
            child = node._get_node(key) if isinstance(node, DictConfig) else node[key]
            found += target_nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (ListConfig, list, tuple)):
        for index, child in enumerate(node):
            found += target_nodes(child, f"{path}[{index}]")
    return found


def instantiate(node: Any, *, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` after :func:`check_targets`; ``key`` (the
    node's place: ``optimizer``) names it in errors. A ``ValueError`` of the target's own
    checks (``torch.optim.SGD(lr=-1)``) is a one-line :class:`OptionError`."""
    check_targets(node, key)
    try:
        return hydra_instantiate(node, **execution_whitelist(hydra_allowed()), **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise OptionError(f"{key}: {cause}") from None
        raise
