"""How to invoke LVM: command prefix, extra arguments, default timeout, optional --config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_common.devmapper import has_device_mapper

#: Arguments that disable activation (every device-mapper interaction) for one command.
#: Needed on kernels without device-mapper: metadata operations still work.
DRIVERLOADED_NO: tuple[str, ...] = ("--driverloaded", "n")


@dataclass(frozen=True)
class LvmSettings:
    """Documented settings of the LVM layer.

    command:    the prefix that runs lvm, e.g. ``("lvm",)`` or
                ``("nsenter", "--mount=/proc/1/ns/mnt", "--ipc=/proc/1/ns/ipc", "--", "lvm")``
                in a container (the IPC namespace carries libdevmapper's udev cookies).
    extra_args: appended after every sub-command, e.g. ``("--driverloaded", "n")`` on a kernel
                without device-mapper (see ``Lvm.settings_for_this_kernel``).
    timeout:    default per-command timeout in seconds (each method may override it).
    config:     optional ``--config`` string, e.g. ``'devices { filter = ["a|.*|"] }'``.
    env:        extra environment variables for lvm (``LVM_SUPPRESS_FD_WARNINGS=1`` is always
                set: lvm otherwise warns on stderr about every inherited file descriptor).
    """

    command: Sequence[str] = ("lvm",)
    extra_args: Sequence[str] = ()
    timeout: float = 60.0
    config: str | None = None
    env: Sequence[tuple[str, str]] = ()  # added to LVM_SUPPRESS_FD_WARNINGS=1 (always set)

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML config) but store tuples: the settings stay hashable.
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "env", tuple((str(k), str(v)) for k, v in self.env))
        if not self.command:
            raise ValueError("LvmSettings.command must not be empty")
        if self.timeout <= 0:
            raise ValueError("LvmSettings.timeout must be positive")

    @property
    def activation_disabled(self) -> bool:
        """True when extra_args carry ``--driverloaded n`` (no device-mapper interaction)."""
        args = list(self.extra_args)
        for i, arg in enumerate(args):
            if arg == "--driverloaded" and i + 1 < len(args):
                if args[i + 1].lower() in ("n", "no", "0"):
                    return True
            if arg.startswith("--driverloaded="):
                if arg.split("=", 1)[1].lower() in ("n", "no", "0"):
                    return True
        return False

    @classmethod
    def for_this_kernel(cls, **kw: object) -> LvmSettings:
        """Settings with ``--driverloaded n`` added when this kernel has no device-mapper."""
        settings = cls(**kw)  # type: ignore[arg-type]
        if has_device_mapper() or settings.activation_disabled:
            return settings
        return cls(
            command=settings.command,
            extra_args=(*settings.extra_args, *DRIVERLOADED_NO),
            timeout=settings.timeout,
            config=settings.config,
            env=settings.env,
        )

    @classmethod
    def from_options(
        cls,
        command: Sequence[str],
        extra_args: Sequence[str],
        timeout: float,
        config: str,
        *,
        auto_driverloaded: bool,
    ) -> LvmSettings:
        """The settings behind a service's ``lvm_*`` options (an empty ``config`` means none);
        ``auto_driverloaded`` applies :meth:`for_this_kernel`."""
        if auto_driverloaded:
            return cls.for_this_kernel(command=tuple(command), extra_args=tuple(extra_args),
                                       timeout=timeout, config=config or None)
        return cls(command=tuple(command), extra_args=tuple(extra_args), timeout=timeout,
                   config=config or None)
