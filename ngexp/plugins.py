"""Plugins: a researcher's own models, data sets, optimizers, preconditioners, pruning
criteria, callbacks and loggers, from a package of theirs (``docs/extending.md``).

A plugin is a Python module. ngexp imports it before it composes a config, so the module's
``@configurable(group, name)`` declarations (:mod:`ngexp.options`) register their schemas as
ngexp's own do, and a ``conf/<group>/<option>.yaml`` folder beside the module adds presets.
Every schema of a plugin that no preset names is also an option of its group under its own
name (``@configurable("optimizer", "lion")`` gives ``optimizer=lion``).

Plugins are found in two places, read in this order:

- the entry points of the group ``ngexp.plugins`` of every installed distribution
  (``[project.entry-points."ngexp.plugins"] mine = "mypkg.ngexp_plugin"``);
- the environment variable ``NGEXP_PLUGINS``: module names separated by commas, for a module
  on ``PYTHONPATH`` that is not packaged.

``NGEXP_DISABLE_PLUGIN_AUTOLOAD=1`` leaves the entry points out (as pytest's
``PYTEST_DISABLE_PLUGIN_AUTOLOAD``): a way around a broken plugin package until it is fixed.

A plugin that cannot be imported, or that registers a name ngexp (or another plugin) already
has, stops ngexp with one line naming it (:class:`PluginError`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from ngexp.errors import UserError

#: The entry point group a plugin package declares its module in.
ENTRY_POINT_GROUP = "ngexp.plugins"
#: The environment variable naming plugin modules (comma-separated).
PLUGINS_VARIABLE = "NGEXP_PLUGINS"
#: The environment variable that, set to 1, turns the entry points off.
NO_AUTOLOAD_VARIABLE = "NGEXP_DISABLE_PLUGIN_AUTOLOAD"


class PluginError(UserError):
    """A plugin could not be loaded (import error, a name taken already)."""


@dataclass(frozen=True)
class Plugin:
    """One loaded plugin: where it was declared (``entry point NAME`` or ``NGEXP_PLUGINS``),
    its module's name and its preset folder (``<module dir>/conf``, ``None`` without one)."""

    source: str
    module: str
    conf: Path | None


def declared() -> list[tuple[str, str]]:
    """``(source, module)`` of every declared plugin, entry points first, each module once."""
    points = [] if os.environ.get(NO_AUTOLOAD_VARIABLE) == "1" else sorted(
        entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name)
    found = [(f"entry point {point.name!r} of {distribution(point)}",
              point.value.split(":")[0].strip()) for point in points]
    found += [("NGEXP_PLUGINS", name.strip())
              for name in os.environ.get(PLUGINS_VARIABLE, "").split(",") if name.strip()]
    unique: dict[str, str] = {}
    for source, module in found:
        unique.setdefault(module, source)
    return [(source, module) for module, source in unique.items()]


def distribution(point: EntryPoint) -> str:
    """The installed distribution that declares ``point`` (what to fix or uninstall)."""
    dist = getattr(point, "dist", None)
    return f"{dist.name}" if dist is not None else "an installed package"


def import_plugin(source: str, module: str) -> Plugin:
    """Import ``module`` (its ``@configurable`` declarations register); one line on failure."""
    try:
        imported = importlib.import_module(module)
    except UserError as error:
        raise PluginError(f"plugin {module!r} ({source}): {error}") from None
    except Exception as error:  # noqa: BLE001  (any failure of the plugin's own code)
        hint = "" if source == PLUGINS_VARIABLE else (
            f" (fix or uninstall it; {NO_AUTOLOAD_VARIABLE}=1 skips installed plugins)")
        raise PluginError(f"plugin {module!r} ({source}) failed to import: "
                          f"{type(error).__name__}: {error}{hint}") from None
    folder = Path(imported.__file__ or "").parent / "conf" if getattr(imported, "__file__", None) \
        else None
    return Plugin(source, module, folder if folder is not None and folder.is_dir() else None)


@cache
def load() -> tuple[Plugin, ...]:
    """Import every declared plugin once per process (:func:`declared`)."""
    return tuple(import_plugin(source, module) for source, module in declared())


def is_plugin_module(module: str) -> bool:
    """Whether a target defined in ``module`` comes from a plugin, not from ngexp itself."""
    return module != "ngexp" and not module.startswith("ngexp.")
