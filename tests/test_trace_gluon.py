"""benchmarks/trace_gluon.py's patches still apply to the Gluon kernel (they are text patches: a kernel
change that breaks one should fail here, on the CPU, not on the next GPU session)."""

import ast
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trace_patches_apply_to_the_kernel():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        tg = _load(os.path.join(ROOT, "benchmarks", "trace_gluon.py"), "trace_gluon")
    finally:
        sys.path.pop(0)
    src = open(tg.KERNEL).read()
    traced = tg.instrument(src)
    ast.parse(traced)  # still Python
    assert traced != src
    # every patch applied once at least: the clock helper, 5 stamps per K step, 4 in the epilogue,
    # 2 around it, 3 in the loader
    assert traced.count("_clock(") == 15
    assert "TRACE_PID" in traced and "trace_ptr" in traced
