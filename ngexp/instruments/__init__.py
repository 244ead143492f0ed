"""Research instruments: measurements of a model that a training callback takes every N steps.

- :mod:`~ngexp.instruments.tangent`: tangent kernels on a fixed probe set, their centered
  alignment with the labels, effective rank and top-k eigenvalue mass (Baratin et al. 2021);
- :mod:`~ngexp.instruments.filters`: implicit filter-level sparsity of CNNs, by BatchNorm scale
  and by dead ReLU activations, its FLOPs and the masks that prune it (Mehta et al. 2019);
- :mod:`~ngexp.instruments.gradients`: per-example gradient norms and the gradient noise scale
  B_simple (Rochette et al. 2019; McCandlish et al. 2018), from the curvature core's capture;
- :mod:`~ngexp.instruments.flow`: the gradient reaching each time step of a recurrence
  (Cooijmans et al. 2016).

:mod:`~ngexp.instruments.callbacks` runs them during training (config group ``callbacks``:
``tangent_alignment``, ``filter_sparsity``, ``gradient_noise``, ``gradient_flow``; importing
this package registers their schemas) and logs them under ``dynamics/``.

They depend on :mod:`ngexp.curvature`, :mod:`ngexp.prune`, :mod:`ngexp.data`,
:mod:`ngexp.models` and the callback interface :mod:`ngexp.callbacks` only, never on
:mod:`ngexp.train`, :mod:`ngexp.optim` or :mod:`ngexp.cli`.
"""

from __future__ import annotations

from ngexp.instruments.callbacks import (
    FilterSparsity,
    GradientFlow,
    GradientNoise,
    TangentAlignment,
)
from ngexp.instruments.filters import (
    FilterState,
    conv_norm_pairs,
    dead_filter_masks,
    dead_flops,
    dense_flops,
    filter_metrics,
    filter_sparsity,
)
from ngexp.instruments.flow import flow_metrics, hidden_gradient_norms
from ngexp.instruments.gradients import GradientProbe, gradient_metrics, measure_example_gradients
from ngexp.instruments.tangent import (
    TangentKernels,
    kernel_metrics,
    probe_set,
    tangent_alignment,
    tangent_kernels,
)

__all__ = [
    "FilterSparsity",
    "FilterState",
    "GradientFlow",
    "GradientNoise",
    "GradientProbe",
    "TangentAlignment",
    "TangentKernels",
    "conv_norm_pairs",
    "dead_filter_masks",
    "dead_flops",
    "dense_flops",
    "filter_metrics",
    "filter_sparsity",
    "flow_metrics",
    "gradient_metrics",
    "hidden_gradient_norms",
    "kernel_metrics",
    "measure_example_gradients",
    "probe_set",
    "tangent_alignment",
    "tangent_kernels",
]
