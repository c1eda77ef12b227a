"""Thin DVC stage entry points: ``python -m stages.<name> --help``.

Each module declares ``PARAMS``, the params.yaml keys it reads (a test checks dvc.yaml declares
exactly these), parses its arguments, loads the typed config, and calls one library function.
"""
