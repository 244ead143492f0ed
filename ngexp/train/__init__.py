"""Training: a run is built from its config (:mod:`ngexp.train.build`), trained by the loop of
:mod:`ngexp.train.trainer` and wrapped in a session (:mod:`ngexp.train.session`). Importing this
package registers the learning-rate schedule, logger and callback schemas."""

from ngexp.train import early_stopping, loggers, lr_schedule  # noqa: F401  (registers schemas)
