"""Plain ``nn.Module`` networks, free of Lightning, shared by the tasks.

What a task asks of its network is stated once, as the base classes in :mod:`lmlab.models.base`:
:class:`LanguageModelNetwork`, :class:`ClassifierNetwork` and :class:`Seq2SeqNetwork`; every network here
inherits one. The Transformers are assembled from the parts in :mod:`lmlab.models.transformer`.

A constructor's defaults are the values of its ``conf/model/*.yaml``, or absent where the configs differ
(``cell``) or the data decides (sizes, padding ids), so a network built in code is the one a config builds.

These modules import nothing above them (no task, config or run machinery): the network that starts from an
lmlab checkpoint (``model=from_checkpoint``) reads one, so it is :class:`lmlab.run.from_checkpoint.CheckpointLM`.
"""

from lmlab.models.base import ClassifierNetwork, LanguageModelNetwork, Seq2SeqNetwork
from lmlab.models.classifiers import BagOfNGrams, HFEncoderClassifier, RNNClassifier, TextCNN, TransformerClassifier
from lmlab.models.gpt import GPT
from lmlab.models.hf_causal_lm import PretrainedCausalLM
from lmlab.models.rnn import RecurrentLM

__all__ = [
    "GPT",
    "BagOfNGrams",
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
