"""The audit trail: one line per Encrypt/Decrypt (who asked, which key, what came out).

Operators verify that encryption is on by seeing these lines.  They carry the request uid,
the API, the method, the status code and the key_id as ``sha256:<hex>``; never key material,
plaintext or ciphertext.  The lines have the schema of edge_common.log's lines (``ts``,
``level``, ``logger``, ``msg`` plus fields) but do not go through the logging machinery: a
request only appends a tuple to a buffer, and a writer thread formats and writes the buffered
lines in one go at most ``FLUSH_DELAY`` later (and at shutdown).  On the Encrypt/Decrypt path
that costs about a microsecond instead of the ~50 µs of a logging call with a flush, which
would be more than the whole cryptography.  A crash can lose the last ``FLUSH_DELAY`` of
lines.  ``--no-audit-log`` turns them off.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

LOGGER = "kms_plugin.audit"
_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]  # C, as json.dumps
FLUSH_DELAY = 0.05  # seconds a line may wait in the buffer

Entry = tuple[float, str, str, str, str, str, str]  # ts, api, method, code, uid, key, error


_second: list[tuple[int, str]] = [(-1, "")]  # the last formatted second (writer thread)


def _ts(now: float) -> str:
    whole = int(now)
    cached = _second[0]
    if cached[0] != whole:  # strftime once per second, not once per line
        cached = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
        _second[0] = cached
    return f"{cached[1]}.{int(now % 1 * 1000):03d}Z"


class AuditLog:
    def __init__(self, *, json_format: bool = True, stream: TextIO | None = None) -> None:
        self.json_format = json_format
        self._stream = stream
        self._buffer: list[Entry] = []
        self._lock = threading.Lock()
        self._pending = threading.Event()
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="kms-audit", daemon=True)
        self._writer.start()

    def record(self, api: str, method: str, code: str, uid: str, key_id_hash: str,
               error: str = "") -> None:
        entry = (time.time(), api, method, code, uid, key_id_hash, error)
        with self._lock:
            self._buffer.append(entry)
            first = len(self._buffer) == 1
        if first:
            self._pending.set()

    def format(self, entry: Entry) -> str:
        now, api, method, code, uid, key_id_hash, error = entry
        level = "info" if code == "OK" else "warning"
        msg = f"{api} {method}" + (f" refused: {error}" if error else "")
        if self.json_format:
            # the line json.dumps would write for these keys, built directly (it costs a
            # third): only the caller's uid and the message need escaping, the rest are our
            # own tokens (api, method, code name, "sha256:<hex>")
            return (
                f'{{"ts": "{_ts(now)}", "level": "{level}", "logger": "{LOGGER}", '
                f'"msg": {_quote(msg)}, "request_uid": {_quote(uid)}, "api": "{api}", '
                f'"method": "{method}", "code": "{code}", "key_id_hash": "{key_id_hash}"}}'
            )
        return (f"{level:7} {LOGGER}: {msg}  [request_uid={uid} api={api} method={method} "
                f"code={code} key_id_hash={key_id_hash}]")

    def flush(self) -> None:
        with self._lock:
            entries, self._buffer = self._buffer, []
        if not entries:
            return
        text = "".join(self.format(e) + "\n" for e in entries)
        stream = self._stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stderr must not fail the plugin

    def _run(self) -> None:
        while not self._closed:
            self._pending.wait()
            self._pending.clear()
            time.sleep(FLUSH_DELAY)  # let a burst collect into one write
            self.flush()

    def close(self) -> None:
        self._closed = True
        self._pending.set()
        self.flush()


__all__ = ["AuditLog", "FLUSH_DELAY"]
