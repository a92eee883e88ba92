"""FoT training: the trainer, its data recipe, synthetic retrieval documents and tokenizer training."""
