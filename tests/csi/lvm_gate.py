#!/usr/bin/env python3
"""An `lvm` command prefix for tests: holds one chosen lvm call at a gate.

    lvm_command = [sys.executable, "tests/csi/lvm_gate.py"]   (then: <subcommand> <args...>)

Environment: CSI_GATE_DIR=<dir>. When <dir>/armed exists and holds "<subcommand> [word]" that
matches this call (the word, if given, must be one of the arguments), the call claims the gate
(the file is renamed: one call only), writes <dir>/reached, and waits until <dir>/release
(then it runs lvm) or <dir>/drop (then it exits 5 without running lvm: the command "never
happened"). Every other call runs lvm at once.
"""

import os
import sys
import time


def main() -> None:
    args = sys.argv[1:]
    gate = os.environ.get("CSI_GATE_DIR", "")
    if gate and args:
        armed = os.path.join(gate, "armed")
        try:
            with open(armed) as f:
                words = f.read().split()
        except OSError:
            words = []
        if words and words[0] == args[0] and all(w in args for w in words[1:]):
            claimed = os.path.join(gate, f"claimed-{os.getpid()}")
            try:
                os.rename(armed, claimed)
            except OSError:
                claimed = ""
            if claimed:
                with open(os.path.join(gate, "reached.tmp"), "w") as f:
                    f.write(str(os.getpid()))
                os.rename(os.path.join(gate, "reached.tmp"), os.path.join(gate, "reached"))
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    if os.path.exists(os.path.join(gate, "drop")):
                        sys.stderr.write("lvm_gate: dropped\n")
                        sys.exit(5)
                    if os.path.exists(os.path.join(gate, "release")):
                        break
                    time.sleep(0.02)
    os.execvp("lvm", ["lvm", *args])


if __name__ == "__main__":
    main()
