"""Build of metakernels: the Python package plus the optional C++ extension ``metakernels._C``.

    pip install --no-build-isolation -e .              # development: builds _C in place
    pip install --no-build-isolation .                 # regular install
    METAKERNELS_NO_EXTENSION=1 pip install ...         # pure Python (the torch backend only)

``--no-build-isolation``: the extension must be compiled against the torch it will run with, and
an isolated build environment would download another (CUDA) torch wheel to build against.

The extension is optional: without torch at build time, without a C++ compiler, or when the
compilation fails, the build warns and installs the pure-Python package.

Sources: every ``*.cpp`` in ``csrc/`` (kernels) and ``python/`` (bindings). CMakeLists.txt
builds the same sources by globbing the same directories (``SOURCE_DIRS`` in both files).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import warnings

from setuptools import setup
from setuptools.errors import CCompilerError, ExecError, PlatformError

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIRS = ("csrc", "python")
# -fno-math-errno / -fno-trapping-math, as torch itself is built: they let the compiler vectorise
# sqrt and the branch-free exp of the kernels (FP exceptions and errno are never read).
# -ffp-contract=off: no fused multiply-add where a kernel must round as torch's separate ops do
# (the rotary forward is bitwise Hugging Face's).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=off"]
LINK_FLAGS = ["-fopenmp"]


def _skip(reason: str) -> None:
    msg = f"metakernels: building without the C++ extension: {reason}"
    print(msg, file=sys.stderr)
    warnings.warn(msg, stacklevel=2)


def _sources() -> list[str]:
    # Relative paths: setuptools rejects absolute ones in an sdist/wheel build.
    files = []
    for d in SOURCE_DIRS:
        files += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, d, "*.cpp")))
    return files


def _extension_kwargs() -> dict:
    if os.environ.get("METAKERNELS_NO_EXTENSION", "0") == "1":
        _skip("METAKERNELS_NO_EXTENSION=1")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        _skip(f"torch is not importable at build time ({e}); build with --no-build-isolation "
              f"in an environment that has torch")
        return {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _skip(f"no C++ compiler ({cxx!r} is not on PATH; set CXX)")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns and carries on when the compilation fails."""

        def run(self):
            try:
                super().run()
            except (CCompilerError, ExecError, PlatformError, OSError,
                    subprocess.CalledProcessError, RuntimeError) as e:
                # RuntimeError: what torch's ninja build raises when a compile step fails.
                _skip(f"the compilation failed ({type(e).__name__}: {e})")
                self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

        def get_output_mapping(self):
            return super().get_output_mapping() if self.extensions else {}

    ext = CppExtension(
        name="metakernels._C",
        sources=_sources(),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
        libraries=["gomp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_extension_kwargs())
