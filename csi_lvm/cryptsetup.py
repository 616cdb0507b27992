"""Every `cryptsetup` invocation of the driver (LUKS2 on a block device).

Secrets go through stdin (``--key-file -``), never argv, the environment or a file. The key
slot KDF is PBKDF2 at its minimum: the secret is 256 random bits, so stretching would add
seconds of CPU (Argon2's default: a gigabyte of memory) to every open and buy nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_common.commands import CommandError, CommandNotFound, CommandTimeout, run

log = logging.getLogger(__name__)

CIPHER = "aes-xts-plain64"
KEY_BITS = 512  # XTS: two AES-256 keys
TOKEN_ID = 0
KEYSLOT = 0
DEFAULT_TIMEOUT = 60.0
MAPPER_DIR = "/dev/mapper"
_FORMAT_ARGS = ("--type", "luks2", "--batch-mode", "--cipher", CIPHER, "--key-size",
                str(KEY_BITS), "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                "--hash", "sha256", "--key-slot", str(KEYSLOT),
                # A 1 MiB header (2 x 16 KiB metadata, 3 key slots) instead of 16 MiB: small
                # volumes stay usable, and crypto-erase has 1 MiB to destroy.
                "--luks2-metadata-size", "16k", "--luks2-keyslots-size", "992k")


# libdevmapper makes /dev/mapper/<name> itself and does not wait for udev rules, as the
# driver's LVM does (udev_rules = 0): the node exists when cryptsetup returns, with or
# without a udev that has device-mapper rules.
_ENV = {"DM_DISABLE_UDEV": "1"}


class CryptError(Exception):
    """cryptsetup failed, timed out or is missing (the message says which)."""

    def __init__(self, message: str, *, busy: bool = False, missing: bool = False,
                 timeout: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.busy = busy
        self.missing = missing
        self.timeout = timeout


@dataclass(frozen=True)
class LuksHeader:
    uuid: str
    data_offset: int  # bytes: where the encrypted data starts (the header ends before)
    tokens: dict[str, dict[str, object]]


class Cryptsetup:
    def __init__(self, binary: str = "cryptsetup", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.binary = binary
        self.timeout = timeout

    def _run(self, *args: str, secret: bytes | None = None, doing: str) -> str:
        argv = [self.binary, *args]
        try:
            result = run(argv, timeout=self.timeout, input=secret, env=_ENV)
        except CommandNotFound:
            raise CryptError(f"{doing}: {self.binary} is not installed on this node",
                             missing=True) from None
        except CommandTimeout as exc:
            raise CryptError(f"{doing}: {exc}", timeout=True) from None
        except CommandError as exc:
            text = exc.result.stderr_text
            # cryptsetup exits 5 for "device already exists or device is busy".
            raise CryptError(f"{doing}: cryptsetup exited {exc.returncode}: {text[:500]}",
                             busy=exc.returncode == 5) from None
        return result.stdout_text

    def installed(self) -> bool:
        return shutil.which(self.binary) is not None

    # ------------------------------------------------------------------ header

    def format(self, device: str, secret: bytes, luks_uuid: str) -> None:
        self._run("luksFormat", *_FORMAT_ARGS, "--uuid", luks_uuid, "--key-file", "-", device,
                  secret=secret, doing=f"formatting LUKS2 on {device}")

    def import_token(self, device: str, token_json: str, *, replace: bool = False) -> None:
        args = ["token", "import", "--token-id", str(TOKEN_ID), "--json-file", "-"]
        if replace:
            args.append("--token-replace")
        self._run(*args, device, secret=token_json.encode(),
                  doing=f"storing the key token on {device}")

    def header(self, device: str) -> LuksHeader | None:
        """The LUKS2 header of device, or None when it holds none."""
        try:
            text = self._run("luksDump", "--dump-json-metadata", device,
                             doing=f"reading the LUKS2 header of {device}")
        except CryptError as exc:
            if exc.missing or exc.timeout or self.is_luks(device):
                raise
            return None
        uuid = self._run("luksUUID", device, doing=f"reading the LUKS2 UUID of {device}")
        try:
            meta = json.loads(text)
            offset = int(meta["segments"]["0"]["offset"])
            tokens = {str(k): v for k, v in meta.get("tokens", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CryptError(f"the LUKS2 metadata of {device} is not what cryptsetup "
                             "writes") from None
        return LuksHeader(uuid.strip(), offset, tokens)

    def is_luks(self, device: str) -> bool:
        try:
            self._run("isLuks", "--type", "luks2", device, doing=f"probing {device}")
        except CryptError as exc:
            if exc.missing or exc.timeout:
                raise
            return False
        return True

    def export_token(self, device: str) -> str:
        return self._run("token", "export", "--token-id", str(TOKEN_ID), device,
                         doing=f"reading the key token of {device}")

    def test_secret(self, device: str, secret: bytes) -> None:
        self._run("open", "--test-passphrase", "--key-file", "-", device, secret=secret,
                  doing=f"checking the volume key of {device}")

    def erase(self, device: str) -> None:
        """Destroy every key slot (luksErase); the data is noise from here on."""
        self._run("luksErase", "--batch-mode", device, doing=f"erasing the key slots of {device}")

    # ------------------------------------------------------------------ mappings

    def open(self, device: str, name: str, secret: bytes) -> None:
        self._run("open", "--type", "luks2", "--key-file", "-", device, name, secret=secret,
                  doing=f"opening {device}")

    def close(self, name: str) -> None:
        self._run("close", name, doing=f"closing {name}")

    def resize(self, name: str, secret: bytes) -> None:
        self._run("resize", "--key-file", "-", name, secret=secret, doing=f"resizing {name}")


def mapper_path(name: str) -> str:
    return f"{MAPPER_DIR}/{name}"


def mapping_backing_device(name: str) -> int | None:
    """The device number under an open dm-crypt mapping (from sysfs), or None when closed."""
    try:
        rdev = os.stat(mapper_path(name)).st_rdev
    except OSError:
        return None
    slaves = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/slaves")
    try:
        for slave in slaves.iterdir():
            major, minor = (slave / "dev").read_text().strip().split(":")
            return os.makedev(int(major), int(minor))
    except OSError:
        return None
    return None


__all__ = ["CIPHER", "CryptError", "Cryptsetup", "LuksHeader", "mapper_path",
           "mapping_backing_device"]
