#!/bin/sh
# The lvm command prefix of the fault-injection tests (tests/kernel/faults.py).
#
# Runs `lvm "$@"`, except for ONE armed call: when $LVM_FAULT_DIR/armed holds
# "<subcommand> <N> <strace inject actions>" (e.g. "lvextend 23 error=EINTR:signal=KILL") and
# this call is that sub-command, it claims the file and runs lvm under strace, which applies
# the actions at lvm's Nth ioctl - a chosen point INSIDE the command (the first device-mapper
# call after lvcreate's metadata commit, the resume after lvextend's suspend, ...). With
# error=EINTR the ioctl itself never runs. The claimed call writes its pid to "started".
# Every call appends its sub-command to "$LVM_FAULT_DIR/calls" (tests count LVM processes).
dir=${LVM_FAULT_DIR:-}
if [ -n "$dir" ]; then
    echo "${1:-}" >> "$dir/calls"
fi
if [ -n "$dir" ] && [ -f "$dir/armed" ]; then
    read -r sub when actions < "$dir/armed"
    if [ "$sub" = "${1:-}" ] && mv "$dir/armed" "$dir/claimed" 2>/dev/null; then
        echo $$ > "$dir/started.tmp" && mv "$dir/started.tmp" "$dir/started"
        exec strace -f -qq -o "$dir/trace" -e trace=ioctl \
            -e "inject=ioctl:$actions:when=$when" lvm "$@"
    fi
fi
exec lvm "$@"
