"""``python -m spectrum_fast.diff A B``: see :func:`spectrum_fast.compare.main`.

(The API function is :func:`spectrum_fast.compare.diff`; this package only hosts the command line.)
"""
