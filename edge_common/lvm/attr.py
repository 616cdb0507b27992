"""Decoding of the 10 characters of ``lv_attr`` (see lvs(8), "lv_attr bits"), in one place."""

from __future__ import annotations

from dataclasses import dataclass

LV_ATTR_LENGTH = 10


@dataclass(frozen=True)
class LvAttr:
    """The lv_attr string, one field per character; ``-`` means "not set"."""

    volume_type: str  # 1: t thin pool, V thin volume, s snapshot, o origin, m mirror, r raid, ...
    permissions: str  # 2: w writeable, r read-only, R read-only activation of a writeable LV
    allocation: str  # 3: a anywhere, c contiguous, i inherited, l cling, n normal (upper=locked)
    fixed_minor: str  # 4: m fixed minor
    state: str  # 5: a active, s suspended, I invalid snapshot, ..., X unknown
    device_open: str  # 6: o open, X unknown
    target_type: str  # 7: t thin, s snapshot, m mirror, r raid, C cache, v virtual, ...
    zero: str  # 8: z newly-allocated blocks are zeroed
    health: str  # 9: p partial, r refresh needed, F failed, D out of data, M metadata ro, X
    skip_activation: str  # 10: k skip activation

    @classmethod
    def parse(cls, text: str) -> LvAttr:
        if len(text) != LV_ATTR_LENGTH:
            raise ValueError(f"lv_attr must have {LV_ATTR_LENGTH} characters: {text!r}")
        return cls(*text)

    def __str__(self) -> str:
        return "".join(
            (
                self.volume_type,
                self.permissions,
                self.allocation,
                self.fixed_minor,
                self.state,
                self.device_open,
                self.target_type,
                self.zero,
                self.health,
                self.skip_activation,
            )
        )

    @property
    def active(self) -> bool:
        return self.state == "a"

    @property
    def state_unknown(self) -> bool:
        """True when lvm could not ask the kernel (e.g. activation disabled)."""
        return self.state == "X"

    @property
    def open(self) -> bool:
        return self.device_open == "o"

    @property
    def thin_pool(self) -> bool:
        return self.volume_type == "t"

    @property
    def thin_volume(self) -> bool:
        return self.volume_type == "V"

    @property
    def snapshot(self) -> bool:
        """A thick (copy-on-write) snapshot; thin snapshots are thin volumes with an origin."""
        return self.volume_type in ("s", "S")

    @property
    def origin(self) -> bool:
        """The origin of a thick snapshot."""
        return self.volume_type in ("o", "O")

    @property
    def writeable(self) -> bool:
        return self.permissions == "w"

    @property
    def read_only(self) -> bool:
        return self.permissions in ("r", "R")

    @property
    def zeroing(self) -> bool:
        return self.zero == "z"

    @property
    def partial(self) -> bool:
        return self.health == "p"

    @property
    def healthy(self) -> bool:
        """No health problem reported (``-``); ``X`` (unknown) is not healthy."""
        return self.health == "-"

    @property
    def skips_activation(self) -> bool:
        return self.skip_activation == "k"

    @property
    def invalid_snapshot(self) -> bool:
        return self.state in ("I", "S")
