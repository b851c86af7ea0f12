"""Plain ``nn.Module`` networks, free of Lightning, shared by the tasks.

Every language model maps token ids ``(B, T)`` to logits ``(B, T, vocab)`` and can carry a
``state`` between calls (the GPT key/value cache, the RNN hidden state) for fast generation.
Every classifier maps right-padded ids ``(B, T)`` and lengths ``(B,)`` to logits ``(B, classes)``.
"""

from lmlab.models.classifiers import BagOfNGrams, HFEncoderClassifier, RNNClassifier, TextCNN, TransformerClassifier
from lmlab.models.gpt import GPT
from lmlab.models.rnn import RecurrentLM

__all__ = [
    "GPT",
    "BagOfNGrams",
    "HFEncoderClassifier",
    "RNNClassifier",
    "RecurrentLM",
    "TextCNN",
    "TransformerClassifier",
]
