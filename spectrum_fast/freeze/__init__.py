"""``python -m spectrum_fast.freeze MODEL --top 0.5``: see :func:`spectrum_fast.cli.freeze_main`."""
