"""The guest's udev stand-in: completes device-mapper udev cookies, nothing else.

    python -m kernel_guest.udevd        (started by the guest's job.sh before the job)

With udev synchronisation on (``activation { udev_sync = 1 }``), libdevmapper - inside lvm
and dmsetup - makes a System V semaphore (the "cookie") for every device-mapper change that
raises a uevent, hands it to the kernel, and waits until udev has handled the uevent and
decremented it (Debian's 95-dm-notify.rules: ``dmsetup udevcomplete $env{DM_COOKIE}``).
This daemon does exactly that for every kernel uevent carrying DM_COOKIE, from ITS IPC
namespace, as the host's udevd does. An lvm running in another IPC namespace (a pod that
entered only the host's mount namespace) therefore waits forever with the VG lock held: the
bug class deploy/ avoids with ``nsenter --ipc``, reproducible in the guest.

libdevmapper synchronises only when udev runs, which it decides by the existence of
/run/udev/control: the daemon creates it once it listens (and job.sh waits for it). Device
nodes stay LVM's job (``udev_rules = 0``), so /dev looks as it did without udev.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from edge_common.commands import CommandError, CommandNotFound, CommandTimeout, run

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
CONTROL = Path("/run/udev/control")


def parse_uevent(message: bytes) -> dict[str, str]:
    """A kernel uevent ("action@devpath\\0KEY=VALUE\\0...") as a dict of its KEY=VALUE parts."""
    fields: dict[str, str] = {}
    for part in message.split(b"\0")[1:]:
        key, sep, value = part.partition(b"=")
        if sep:
            fields[key.decode(errors="replace")] = value.decode(errors="replace")
    return fields


def cookie_of(event: dict[str, str]) -> str | None:
    """The device-mapper cookie a uevent carries (95-dm-notify.rules' conditions)."""
    if event.get("SUBSYSTEM") != "block" or not event.get("DEVNAME", "").startswith("dm-"):
        return None
    cookie = event.get("DM_COOKIE", "")
    return cookie if cookie.isdigit() and cookie != "0" else None


def complete(cookie: str) -> None:
    try:
        run(["dmsetup", "udevcomplete", cookie], timeout=60)
    except (CommandError, CommandTimeout, CommandNotFound) as exc:
        print(f"udevd: dmsetup udevcomplete {cookie}: {exc}", file=sys.stderr, flush=True)


def serve(control: Path = CONTROL) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((os.getpid(), KERNEL_GROUP))
    control.parent.mkdir(parents=True, exist_ok=True)
    control.touch()
    print(f"udevd: completing device-mapper cookies (pid {os.getpid()})", flush=True)
    while True:
        event = parse_uevent(sock.recv(1 << 16))
        cookie = cookie_of(event)
        if cookie is not None:
            complete(cookie)


if __name__ == "__main__":
    serve()
