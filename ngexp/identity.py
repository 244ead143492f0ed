"""Run identity: what of a config names its run directory, stable across ngexp versions.

The hash of ``<output_root>/<name>/<hash>/seed_<seed>/`` covers what the user chose, not what a
version happens to default to (open_lth's rule): the schema of every group node (``optimizer``
is ``optimizer/kfac``: the group choice as far as it matters) and every semantic setting whose
value differs from its *reference default*; the seed and the non-semantic keys
(:data:`ngexp.config.NON_SEMANTIC_KEYS`) are left out. So a new option with a default moves no
directory, and a preset's or an experiment's values count like values on the command line.

The reference default of a setting is its default when it was first recorded in
``identity_defaults.json`` (one entry per schema and field), else its current default. Changing
a default therefore changes the hash of every run that now takes the new default (its value no
longer equals the recorded one), while explicit settings of the old value keep their
directories. ``python -m ngexp.identity`` records the defaults of new options (never changing
recorded ones); a test fails while one is missing.

Run directories of the previous scheme (which hashed every setting, defaults included) are
found by :func:`matches_stored`: a stored ``config.yaml`` is the same run when its semantic
settings equal today's, a setting it lacks (added since) counting as its reference default.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ngexp.config import TrainConfig, TrainerConfig, semantic_config
from ngexp.options import is_missing

RECORDED = Path(__file__).with_name("identity_defaults.json")
#: Schema id of the two top-level schemas (group schemas carry ``__schema_id__``).
TOP_LEVEL = {TrainConfig: "run", TrainerConfig: "trainer"}
#: Never part of the hash: ``semantic_config`` drops the keys of NON_SEMANTIC_KEYS and these.
NOT_IDENTITY = ("logger",)


def plain(value: Any) -> Any:
    """``value`` as JSON sees it (tuples as lists), for comparisons and hashing."""
    return json.loads(json.dumps(value, default=str))


def schema_id(schema: type | None) -> str | None:
    for top, name in TOP_LEVEL.items():
        if isinstance(schema, type) and issubclass(schema, top):
            return name
    return getattr(schema, "__schema_id__", None)


def field_default(item: dataclasses.Field[Any]) -> Any:
    """A field's default (``dataclasses.MISSING`` when required)."""
    if not is_missing(item.default_factory):
        return plain(item.default_factory())
    if is_missing(item.default) or item.default == "???":
        return dataclasses.MISSING
    return plain(item.default)


def schema_defaults(schema: type) -> dict[str, Any]:
    """Field -> current default of a schema dataclass (required fields and ``_target_`` left
    out)."""
    return {item.name: default for item in dataclasses.fields(schema)
            if not item.name.startswith("_")
            and (default := field_default(item)) is not dataclasses.MISSING}


@cache
def recorded_defaults() -> dict[str, dict[str, Any]]:
    return json.loads(RECORDED.read_text(encoding="utf-8")) if RECORDED.is_file() else {}


def schema_nodes(cfg: DictConfig, path: str = "") -> dict[str, type]:
    """Dotted path ('' = the root) -> schema dataclass of every schema-typed node."""
    found = {}
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        found[path] = schema
    for key in cfg:
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not (key == "hydra" and not path):
            found.update(schema_nodes(child, f"{path}.{key}" if path else str(key)))
    return found


def reference_defaults(nodes: Mapping[str, type]) -> dict[str, Any]:
    """Dotted key -> reference default (see the module docstring) of every setting."""
    references = {}
    for path, schema in nodes.items():
        recorded = recorded_defaults().get(schema_id(schema) or "", {})
        for name, default in schema_defaults(schema).items():
            references[f"{path}.{name}" if path else name] = recorded.get(name, default)
    return references


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaves of a plain config tree by dotted key (lists are leaves)."""
    found: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            found.update(flatten(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = plain(value)
    return found


def semantic_settings(tree: Mapping[str, Any], targets: bool = False) -> dict[str, Any]:
    """The flat semantic settings of a (semantic) config tree, :data:`NOT_IDENTITY` dropped,
    and ``_target_`` unless ``targets`` (in the hash the schema id stands for it: moving a
    class moves no run)."""
    return {key: value for key, value in flatten(tree).items()
            if key.split(".")[0] not in NOT_IDENTITY
            and (targets or not key.endswith("_target_"))}


def identity(cfg: DictConfig, world_size: int = 1) -> dict[str, Any]:
    """What names the run of ``cfg``: the schema of each node and the settings that differ
    from their reference default (``world_size``: see :func:`ngexp.config.semantic_config`)."""
    nodes = schema_nodes(cfg)
    references = reference_defaults(nodes)
    settings = semantic_settings(semantic_config(cfg, world_size))
    return {"schemas": {path: schema_id(schema) for path, schema in nodes.items()
                        if path and path.split(".")[0] not in NOT_IDENTITY},
            "settings": {key: value for key, value in settings.items()
                         if key not in references or value != references[key]}}


def matches_stored(cfg: DictConfig, stored: Mapping[str, Any], world_size: int = 1,
                   stored_world_size: int = 1) -> bool:
    """Whether ``stored`` (a run's ``config.yaml``, from any ngexp version) is the run of
    ``cfg``: equal semantic settings and ``_target_`` classes (the stored config has no schema
    ids), a setting ``stored`` lacks counting as its reference default; a stored setting that
    no longer exists makes it another run."""
    try:
        theirs = semantic_settings(semantic_config(OmegaConf.create(dict(stored)),
                                                   stored_world_size), targets=True)
    except Exception:  # noqa: BLE001  (an unreadable or foreign config is not this run)
        return False
    ours = semantic_settings(semantic_config(cfg, world_size), targets=True)
    references = reference_defaults(schema_nodes(cfg))
    missing = object()
    for key in ours.keys() | theirs.keys():
        value = theirs.get(key, references.get(key, missing))
        if ours.get(key, missing) != value:
            return False
    return True


def current_defaults() -> dict[str, dict[str, Any]]:
    """Schema id -> field -> current default, for every schema of ngexp's own (a plugin's
    settings are hashed against its current defaults: docs/extending.md)."""
    from ngexp.config import register_all, schema_class
    from ngexp.options import REGISTRY
    from ngexp.plugins import is_plugin_module

    register_all()
    found = {schema_id(TrainConfig): schema_defaults(TrainConfig),
             schema_id(TrainerConfig): schema_defaults(TrainerConfig)}
    for group, specs in REGISTRY.items():
        for name, spec in specs.items():
            if not is_plugin_module(inspect.unwrap(spec.target).__module__):
                found[f"{group}/{name}"] = schema_defaults(schema_class(group, name, spec))
    return {key: found[key] for key in sorted(found)}  # type: ignore[index]


def unrecorded() -> list[str]:
    """``schema.field`` of every current option whose reference default is not recorded."""
    recorded = recorded_defaults()
    return [f"{schema}.{name}" for schema, fields in current_defaults().items()
            for name in fields if name not in recorded.get(schema, {})]


def record_new_defaults() -> list[str]:
    """Add the current defaults of unrecorded options to ``identity_defaults.json`` (recorded
    ones are never changed: they define existing run directories); returns what was added."""
    recorded = {schema: dict(fields) for schema, fields in recorded_defaults().items()}
    added = unrecorded()
    for schema, fields in current_defaults().items():
        for name, default in fields.items():
            recorded.setdefault(schema, {}).setdefault(name, default)
    RECORDED.write_text(json.dumps(dict(sorted(recorded.items())), indent=1, sort_keys=True)
                        + "\n", encoding="utf-8")
    recorded_defaults.cache_clear()
    return added


if __name__ == "__main__":
    new = record_new_defaults()
    print(f"recorded {len(new)} new defaults in {RECORDED}" + "".join(f"\n  {k}" for k in new),
          file=sys.stderr)
