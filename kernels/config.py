"""Kernel launch configurations: one frozen dataclass shared by the launchers (issue 4), the tuner and
the tuning cache (issue 5). A launcher called with ``config=None`` uses its documented default."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int = 128
    BLOCK_N: int = 128
    BLOCK_K: int = 128
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KernelConfig.{k} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown KernelConfig keys: {sorted(unknown)}")
        return cls(**d)
