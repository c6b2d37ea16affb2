"""Data: the samples (samples.py: the shapes benchmark, dataset readers) and the processors that turn them into
model inputs (processor.py: tokenizers, chat prompts, image preprocessing)."""
