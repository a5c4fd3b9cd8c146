import os

import pytest

# Triton kernels run on the CPU through the interpreter when no GPU is present. It must be set before
# triton is imported anywhere.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def isolated_tuning_cache(monkeypatch, tmp_path):
    """Tuning-cache tests: no user cache, no $FP8CONV_TUNING_CACHE, and the shipped configs must not
    answer their look-ups (a test that wants them calls monkeypatch.undo())."""
    from fp8conv.tuning import cache, lookup

    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(cache, "shipped_dir", lambda: shipped)
    lookup.clear()
    yield
    lookup.clear()
