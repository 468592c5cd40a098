"""Training loop, evaluation, checkpoints and logging. Knows tasks only through the plug-in contract."""
