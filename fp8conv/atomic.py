"""Writing a whole output folder atomically (no torch here: `fp8conv example --help` imports it).

The pattern every command follows: build the output in a temporary sibling folder (same file system,
so the final rename is atomic), give it the modes a plain mkdir/open would have given, then rename it
into place. DST is therefore absent, its old self, or complete; never half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def temp_sibling(dst: Path, tag: str = "tmp") -> Path:
    """A new empty folder ``.NAME.TAG-XXXX`` beside ``dst`` (its parent must exist)."""
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.{tag}-", dir=dst.absolute().parent))


def umask_modes(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and some writers make 0600 files; give the folder and everything in
    it the modes the user's umask gives, since checkpoints are shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` to ``dst``. An old ``dst`` is moved aside first and removed only
    after the rename; on an error or a signal between the two renames the old ``dst`` is put back."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    trash = temp_sibling(dst, "old")
    try:
        os.replace(dst, trash / dst.name)
    except BaseException:  # e.g. dst is the current folder (busy): leave no empty trash folder
        trash.rmdir()
        raise
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(trash / dst.name, dst)
        trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)
