"""Data loading, tokenizing, caching and batching for every task."""
