"""A trained model at work, without the machinery that trained it: a language model (network and tokenizer) and
sampling text from it, greedy and beam-search decoding for encoder-decoders, and reading a command's input text."""
