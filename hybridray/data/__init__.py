"""Translated-QA shards: schema, conversion, streaming hybrid batches."""
