"""The curvature core every second-order consumer uses (K-FAC, EKFAC, the natural gradient,
the curvature pruning criteria, per-example gradient statistics).

- :mod:`~ngexp.curvature.layers`: the covered layer kinds as affine maps (Linear, Conv1d/2d,
  Embedding, LayerNorm/GroupNorm/BatchNorm scale and shift): shapes, weight layouts, rows;
  :mod:`~ngexp.curvature.attention`: ``nn.MultiheadAttention``'s four projections;
- :mod:`~ngexp.curvature.capture`: one layer-I/O capture (layers called several times per
  forward, several forwards per step for gradient accumulation, a GradScaler's scale divided
  out), with backward passes recorded by kind (training, sampled); its parts:
  :mod:`~ngexp.curvature.hooks` (the hooks, per layer kind) and
  :mod:`~ngexp.curvature.records` (the records kept and the accumulation policy);
- :mod:`~ngexp.curvature.coverage`: which parameters an estimate covers, reported once;
- :mod:`~ngexp.curvature.tasks`: losses, sampled targets, output Hessians and their factors;
- :mod:`~ngexp.curvature.choices`: the choice names of the curvature options (Fisher type,
  KFAC approximation, Kronecker kind), shared by every estimator and preconditioner;
- :mod:`~ngexp.curvature.kronecker`: Kronecker factors, EKFAC's eigenbasis scaling, K-FAC/EKFAC
  diagonals;
- :mod:`~ngexp.curvature.diagonal`: the exact diagonal GGN (= Fisher here);
- :mod:`~ngexp.curvature.products`: exact Fisher/GGN-vector products;
- :mod:`~ngexp.curvature.per_example`: per-example gradient norms and the gradient noise scale
  from the same capture;
- :mod:`~ngexp.curvature.linalg`: batched eigendecompositions, Cholesky damped inverses, CG.

It depends on nothing in :mod:`ngexp.optim`, :mod:`ngexp.prune` or :mod:`ngexp.train`.
"""
