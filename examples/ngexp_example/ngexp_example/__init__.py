"""An ngexp plugin with one example per extension point (``docs/extending.md``).

Importing the package registers every example; ngexp does it through the entry point
``ngexp.plugins: example = "ngexp_example"`` (or ``NGEXP_PLUGINS=ngexp_example``):

- ``model=resmlp``: :class:`~ngexp_example.resmlp.ResMLP`;
- ``data=npz_folder data.path=DIR``: :func:`~ngexp_example.npz_folder.npz_folder`;
- ``optimizer=lion`` (preset ``optimizer=lion_fast``): :class:`~ngexp_example.lion.Lion`;
- ``optimizer=kfac_relative``: :class:`~ngexp_example.relative_kfac.RelativeKFAC`;
- ``prune.criterion=synflow``: :func:`~ngexp_example.synflow.synflow`;
- ``callbacks=[weight_norms]``: :class:`~ngexp_example.weight_norms.WeightNorms`;
- ``logger=[ndjson]``: :class:`~ngexp_example.ndjson.NDJSONLogger`.
"""

from __future__ import annotations

from ngexp_example import lion, ndjson, npz_folder, relative_kfac, resmlp, synflow, weight_norms

__all__ = ["lion", "ndjson", "npz_folder", "relative_kfac", "resmlp", "synflow", "weight_norms"]
