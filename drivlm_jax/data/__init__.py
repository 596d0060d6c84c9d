"""Input pipeline: tfds data sources + grain, tokenizer, domain mixing."""
