"""Benchmark scripts (run each as ``python benchmarks/<name>.py``).

A regular package, not a bare folder, on purpose: opacus (the ``privacy`` extra) installs a top-level package
named ``benchmarks`` into site-packages, and a regular package found anywhere on ``sys.path`` wins over a
folder without ``__init__.py``; each script puts this checkout first on ``sys.path``, so this one is found.
"""
