"""The command-line tools: ``train.py``/``test.py``, ``rcm-nddr`` and its subcommands, ``python -m decomp``."""
