"""``python -m spectrum_fast.scan MODEL``: see :func:`spectrum_fast.cli.scan_main`.

(The API function is ``spectrum_fast.scan``; this package only hosts the command line.)
"""
