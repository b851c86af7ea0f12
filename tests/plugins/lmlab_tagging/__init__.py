"""A fourth lmlab task, sequence tagging (one tag per word), as a plugin package outside ``src/lmlab``.

Importing the package registers its data module, network and task with :mod:`lmlab.registry`, so
checkpoints may build them; ``pyproject.toml`` beside this folder names the package in the
``lmlab.plugins`` entry-point group, which lmlab imports before it reads a checkpoint. The configs
are in ``conf/`` (``task/tagging.yaml``, ``data/tagging_files.yaml``, ``model/bigru_tagger.yaml``);
a run puts them on Hydra's search path: ``lmlab-train hydra.searchpath=[pkg://lmlab_tagging.conf]
task=tagging ...``.
"""

from lmlab_tagging.data import TaggingDataModule
from lmlab_tagging.model import BiGRUTagger, TaggerNetwork
from lmlab_tagging.task import TaggingTask

__all__ = ["BiGRUTagger", "TaggerNetwork", "TaggingDataModule", "TaggingTask"]
