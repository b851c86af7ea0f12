"""Composing a config and checking it before anything heavy runs: where the config tree lives and the keys of its
top level (:mod:`~lmlab.config.schema`), what each ``_target_`` accepts (:mod:`~lmlab.config.signatures`), the
declared types and ranges of values (:mod:`~lmlab.config.values`), and the checks a command makes before torch is
imported (:mod:`~lmlab.config.prechecks`). Nothing here imports torch or Lightning at module level: the console
scripts import it to answer ``--help``."""
