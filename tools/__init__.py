"""Tools that made the bundled files: train_tiny.py trains the tiny models in the real checkpoint layouts."""
