"""Only the compiled extensions live here; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ["sync", "fastops", "uring", "chunkstate", "gate", "transmit", "cowindex", "wire", "replies", "pagebuf", "tls", "budget", "regionmap"]

extensions = [
    Extension(
        f"appliance._fast.{name}",
        [f"appliance/_fast/{name}.pyx"],
        extra_compile_args=["-O2"],
        libraries={"uring": ["uring"], "tls": ["ssl", "crypto"]}.get(name, []),
    )
    for name in MODULES
    if name not in ("sync", "pagebuf")  # declarations only
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}, include_path=["."]))
