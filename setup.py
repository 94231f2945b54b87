# Builds the Cython hot paths under pgguard/_core; PGGUARD_DEBUG=1 turns on
# annotation, line tracing and the debug assertions of the core.
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PGGUARD_DEBUG") == "1"

macros = [("PGGUARD_DEBUG", "1" if DEBUG else "0")]
if DEBUG:
    macros.append(("CYTHON_TRACE", "1"))

extensions = [
    Extension(
        f"pgguard._core.{name}",
        [f"pgguard/_core/{name}.pyx"],
        define_macros=macros,
        extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
    )
    for name in ("framing", "answers", "relay", "pipe", "sqlshape", "rowmask", "track",
                 "auditline")
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "linetrace": DEBUG,
            "embedsignature": True,
        },
    )
)
