"""Compiled hot loops. Importing a missing module here is an error on purpose:
there is no silent slow path. Build with `pip install .` (or
`python setup.py build_ext --inplace` in a checkout)."""
