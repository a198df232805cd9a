"""The native decode kernels (edgeinfer/native/decode.c), built by `pip install` / `make setup`.

Everything else about the distribution is in pyproject.toml. The C file is built twice on x86-64: with
AVX2/FMA/F16C and without (Python picks by the CPU's flags); once elsewhere (the compiler vectorizes the
portable loops: NEON on aarch64). Both are optional: without a C compiler the install still succeeds and
edgeinfer decodes with the ONNX graph instead, saying so.
"""

import platform

from setuptools import Extension, setup

BASE = ["-O3", "-std=c11", "-fno-math-errno", "-fno-trapping-math", "-pthread"]


def native(variant: str, flags: list[str]) -> Extension:
    name = f"_decode_{variant}"
    return Extension(f"edgeinfer.native.{name}", ["edgeinfer/native/decode.c"], define_macros=[("EI_PYMODULE", name)],
                     extra_compile_args=BASE + flags, extra_link_args=["-pthread"], optional=True)


exts = [native("generic", [])]
if platform.machine().lower() in ("x86_64", "amd64"):
    exts.append(native("avx2", ["-mavx2", "-mfma", "-mf16c"]))

setup(ext_modules=exts)
