"""Build of the optional C extensions flashlm.kernels._ext (and _sign, the sign selector's scores);
everything else is in pyproject.toml.

Plain C, no torch headers. The AVX2 and AVX-512 paths use per-function target attributes (no
-march=native), so one build runs on any x86-64 and picks its path at run time. pool.c (the
kernels' thread pool) needs POSIX threads; elsewhere the kernels run on the calling thread. The extension
is optional: without a compiler flashlm still installs and flashlm.kernels uses its torch
reference (`flashlm.kernels.backend()` says which path is in use).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/flashlm/kernels/csrc"


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            flags = ["/O2", "/fp:precise"]
        else:
            # -ffp-contract=off: dequantisation must round exactly like torch's separate mul and add
            flags = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas",
                     "-pthread"]
        for ext in self.extensions:
            ext.extra_compile_args = flags
            if self.compiler.compiler_type != "msvc":
                ext.extra_link_args = ["-pthread"]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "flashlm.kernels._ext",
            sources=[f"{CSRC}/module.c", f"{CSRC}/pool.c", f"{CSRC}/scalar.c", f"{CSRC}/avx2.c", f"{CSRC}/avx512.c",
                     f"{CSRC}/drivers.c", f"{CSRC}/attn.c", f"{CSRC}/layer.c"],
            depends=[f"{CSRC}/kernels.h", f"{CSRC}/drivers.h", f"{CSRC}/x86.h"],
            include_dirs=[CSRC],
            optional=True,
        ),
        # the sign selector's scores (flashlm.kernels.sign): one file, its own run-time dispatch
        Extension("flashlm.kernels._sign", sources=[f"{CSRC}/sign.c"], optional=True),
        # batched io_uring reads for the bundle reader (flashlm.io.batch_backend); Linux only, optional
        Extension("flashlm.io._uring_batch", sources=["src/flashlm/io/csrc/uring_batch.c"], optional=True),
    ],
    cmdclass={"build_ext": BuildExt},
)
