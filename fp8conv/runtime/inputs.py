"""Model inputs: a batch of user contexts (``ContextBatch``) and its file format.

A context is a user's feature tokens, each tagged with the pathway it came from (0 static, 1 short-term,
2 long-term; config.PATHWAYS). Users' contexts differ in length: ``tokens`` and ``pathways`` are
right-padded to the longest one and ``lengths`` says how many positions of each row are real. Padded
positions are never attended to (the cross-attention masks them), so their values do not matter; we
write 0.

On disk (``contexts.safetensors``): int64 tensors ``tokens`` (U, S), ``pathways`` (U, S), ``lengths``
(U,) and optionally ``labels`` (U, 3), the semantic IDs of each user's held-out next item.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8conv.config import OneRecConfig
from fp8conv.errors import UserError

CONTEXTS_FILE = "contexts.safetensors"


@dataclass(frozen=True)
class ContextBatch:
    tokens: torch.Tensor  # (U, S) int64
    pathways: torch.Tensor  # (U, S) int64
    lengths: torch.Tensor  # (U,) int64, 1 <= lengths <= S
    labels: torch.Tensor | None = None  # (U, levels) int64 or None

    def __post_init__(self) -> None:
        self.check()

    def check(self, source: str = "contexts") -> None:
        """Shapes and dtypes (internal consistency); raises UserError naming ``source``."""
        t, p, n = self.tokens, self.pathways, self.lengths
        for name, x, dim in (("tokens", t, 2), ("pathways", p, 2), ("lengths", n, 1)):
            if not isinstance(x, torch.Tensor) or x.dim() != dim or x.dtype != torch.int64:
                raise UserError(f"{source}: '{name}' must be a {dim}-D int64 tensor, got "
                                f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
        if p.shape != t.shape or n.shape != (t.shape[0],):
            raise UserError(f"{source}: shapes disagree: tokens {tuple(t.shape)}, pathways "
                            f"{tuple(p.shape)}, lengths {tuple(n.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise UserError(f"{source}: empty batch (tokens shape {tuple(t.shape)})")
        if int(n.min()) < 1 or int(n.max()) > t.shape[1]:
            raise UserError(f"{source}: 'lengths' must lie in [1, {t.shape[1]}], got "
                            f"[{int(n.min())}, {int(n.max())}]")
        if self.labels is not None:
            lab = self.labels
            if lab.dtype != torch.int64 or lab.dim() != 2 or lab.shape[0] != t.shape[0]:
                raise UserError(f"{source}: 'labels' must be int64 of shape ({t.shape[0]}, levels), got "
                                f"{lab.dtype} {tuple(lab.shape)}")

    def check_config(self, cfg: OneRecConfig, source: str = "contexts") -> None:
        """Values against a model config: token ids, pathway ids and label codes in range."""
        mask = torch.arange(self.max_len)[None, :] < self.lengths[:, None].cpu()
        tok, pw = self.tokens.cpu()[mask], self.pathways.cpu()[mask]
        if int(tok.min()) < 0 or int(tok.max()) >= cfg.context_vocab_size:
            raise UserError(f"{source}: context token ids must lie in [0, {cfg.context_vocab_size}), got "
                            f"[{int(tok.min())}, {int(tok.max())}]")
        if int(pw.min()) < 0 or int(pw.max()) >= cfg.num_context_pathways:
            raise UserError(f"{source}: pathway ids must lie in [0, {cfg.num_context_pathways}), got "
                            f"[{int(pw.min())}, {int(pw.max())}]")
        if self.labels is not None:
            lab = self.labels
            if lab.shape[1] != cfg.num_semantic_levels or int(lab.min()) < 0 or \
                    int(lab.max()) >= cfg.codebook_size:
                raise UserError(f"{source}: 'labels' must be ({self.num_users}, {cfg.num_semantic_levels}) "
                                f"codes in [0, {cfg.codebook_size})")

    @property
    def num_users(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "ContextBatch":
        lab = None if self.labels is None else self.labels.to(device)
        return ContextBatch(self.tokens.to(device), self.pathways.to(device), self.lengths.to(device), lab)

    def select(self, index) -> "ContextBatch":
        """A sub-batch of users (index: slice, list or LongTensor), trimmed to its longest context."""
        if isinstance(index, int):
            index = [index]
        lengths = self.lengths[index]
        s = int(lengths.max())
        lab = None if self.labels is None else self.labels[index]
        return ContextBatch(self.tokens[index][:, :s].contiguous(), self.pathways[index][:, :s].contiguous(),
                            lengths.contiguous(), lab)

    def to_dict(self) -> dict[str, torch.Tensor]:
        d = {"tokens": self.tokens, "pathways": self.pathways, "lengths": self.lengths}
        if self.labels is not None:
            d["labels"] = self.labels
        return {k: v.detach().cpu().contiguous() for k, v in d.items()}


def load_contexts(path: str | Path, cfg: OneRecConfig | None = None) -> ContextBatch:
    """Read a contexts file; UserError (naming the file) if unreadable or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: contexts file not found")
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    missing = [k for k in ("tokens", "pathways", "lengths") if k not in d]
    if missing:
        raise UserError(f"{path}: missing tensor(s) {', '.join(missing)} (a contexts file holds tokens, "
                        f"pathways, lengths and optionally labels)")
    try:
        batch = ContextBatch(d["tokens"], d["pathways"], d["lengths"], d.get("labels"))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if cfg is not None:
        batch.check_config(cfg, source=str(path))
    return batch


def save_contexts(batch: ContextBatch, path: str | Path) -> None:
    """Write atomically (temp file in the same folder, then os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(batch.to_dict(), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sample_contexts(ckpt_dir: str | Path, cfg: OneRecConfig | None = None) -> ContextBatch | None:
    """The ``contexts.safetensors`` shipped in a checkpoint folder, or None if it has none."""
    path = Path(ckpt_dir) / CONTEXTS_FILE
    return load_contexts(path, cfg) if path.is_file() else None


def synthetic_contexts(cfg: OneRecConfig, n_users: int = 8, seed: int = 0, min_len: int = 1,
                       max_len: int | None = None) -> ContextBatch:
    """Random contexts drawn from the config's vocabularies (no labels), lengths uniform in
    [min_len, max_len]; deterministic for a seed. For checkpoints that ship no sample contexts."""
    max_len = min(max_len or cfg.max_context_length, cfg.max_context_length)
    if not 1 <= min_len <= max_len or n_users < 1:
        raise UserError(f"synthetic contexts: need n_users >= 1 and 1 <= min_len <= max_len, got "
                        f"{n_users}, {min_len}, {max_len}")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n_users,), generator=g)
    s = int(lengths.max())
    tokens = torch.randint(0, cfg.context_vocab_size, (n_users, s), generator=g)
    pathways = torch.randint(0, cfg.num_context_pathways, (n_users, s), generator=g)
    pad = torch.arange(s)[None, :] >= lengths[:, None]
    return ContextBatch(tokens.masked_fill(pad, 0), pathways.masked_fill(pad, 0), lengths)
