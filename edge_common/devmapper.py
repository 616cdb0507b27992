"""Does this kernel offer device-mapper? (Without it LVs cannot be activated.)"""

from pathlib import Path


def has_device_mapper(proc_misc: Path = Path("/proc/misc")) -> bool:
    try:
        text = proc_misc.read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["device-mapper"] for line in text.splitlines())
