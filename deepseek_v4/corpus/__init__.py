"""Tokenized corpora on disk: `prepare` (raw text -> ArrayRecord shards) and the embedded Shakespeare corpus."""
