"""``python -m spectrum_fast.plot RESULT``: see :func:`spectrum_fast.plotting.main`.

(The API function is :func:`spectrum_fast.plotting.plot`; this package only hosts the command line.)
"""
