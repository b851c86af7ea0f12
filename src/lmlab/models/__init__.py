"""Plain ``nn.Module`` networks, free of Lightning, shared by the tasks.

What a task asks of its network is stated once, as the base classes in :mod:`lmlab.models.base`:
:class:`LanguageModelNetwork`, :class:`ClassifierNetwork` and :class:`Seq2SeqNetwork`; every network here
inherits one. The Transformers are assembled from the parts in :mod:`lmlab.models.transformer`.

A constructor's defaults are the values of its ``conf/model/*.yaml``, or absent where the configs differ
(``cell``) or the data decides (sizes, padding ids), so a network built in code is the one a config builds.
"""

from lmlab.models.base import ClassifierNetwork, LanguageModelNetwork, Seq2SeqNetwork
from lmlab.models.classifiers import BagOfNGrams, HFEncoderClassifier, RNNClassifier, TextCNN, TransformerClassifier
from lmlab.models.from_checkpoint import CheckpointLM
from lmlab.models.gpt import GPT
from lmlab.models.hf_causal_lm import PretrainedCausalLM
from lmlab.models.rnn import RecurrentLM

__all__ = [
    "GPT",
    "BagOfNGrams",
    "CheckpointLM",
    "ClassifierNetwork",
    "HFEncoderClassifier",
    "LanguageModelNetwork",
    "PretrainedCausalLM",
    "RNNClassifier",
    "RecurrentLM",
    "Seq2SeqNetwork",
    "TextCNN",
    "TransformerClassifier",
]
