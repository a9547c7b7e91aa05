"""Running an experiment from the command line: ``train.py``'s Hydra run (``run``), the checks before and
around Hydra (``argv_checks``, ``hydra_callbacks``), what ``auto`` means per device (``device_defaults``),
the CPU share of a parallel sweep job (``cpu_share``), the TensorBoard HParams row (``hparams``), how
errors reach the user (``user_errors``) and the resolvers ``conf/`` uses (``resolvers``). A user's own
Lightning code does not need this package."""

from pruneflow.experiment.resolvers import register_resolvers

register_resolvers()
