"""The machinery around a run's task: reading checkpoints safely and writing them whole (:mod:`~lmlab.run.checkpoint`,
:mod:`~lmlab.run.checkpoint_io`), starting a run from a checkpoint (:mod:`~lmlab.run.from_checkpoint`) or continuing
one in its folder (:mod:`~lmlab.run.continuation`), stop signals (:mod:`~lmlab.run.preemption`), DDP inside Hydra
(:mod:`~lmlab.run.distributed`), what a command writes where a user says (:mod:`~lmlab.run.safe_output`), the
one-line user errors and config helpers the commands share (:mod:`~lmlab.run.runtime`), and a sweep's summary
(:mod:`~lmlab.run.sweep`)."""
