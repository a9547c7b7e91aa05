"""Running an experiment from the command line: ``train.py``'s Hydra run (``run``), the checks before and
around Hydra (``argv_checks``, ``hydra_callbacks``), the run folder of a start that fails before training
(``run_folder``), what ``auto`` means per device (``device_defaults``), the CPU share of a parallel sweep job
(``cpu_share``), the TensorBoard HParams row (``hparams``), how errors reach the user (``user_errors``),
Lightning's console noise (``console``), the config composed in-process (``compose_config``), the resolvers
``conf/`` uses (``resolvers``) and the ``trainer`` group's schema of every Lightning ``Trainer`` argument
(``trainer_arguments``); and the two commands installed with the package: ``pruneflow-report`` (``report``: a
sweep's table, figures and findings) and ``pruneflow-compact`` (``compact``: cut a finished run's pruned channels
out). A user's own Lightning code does not need this package."""

from pruneflow.experiment.compose import compose_config
from pruneflow.experiment.resolvers import register_resolvers
from pruneflow.experiment.trainer_arguments import register_trainer_schema

register_resolvers()
register_trainer_schema()

__all__ = ["compose_config"]
