"""Data-parallel training on ``torch.distributed``: the world of this process (rank, size, the
process group set up from ``torchrun``'s or SLURM's environment), the collectives ngexp uses
(coalesced all-reduce and broadcast, agreement on host-side decisions), and the local launcher
behind ``trainer.devices=N``.

It depends on torch and :mod:`ngexp.errors` only, so every layer (curvature, optimizers,
pruning, the trainer) may use it.
"""
