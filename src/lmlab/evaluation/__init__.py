"""Scoring what a model produces: corpus-level metrics (sacreBLEU BLEU and chrF as torchmetrics metrics, exact
under DDP)."""
