"""Names shared by the host side (runner) and the guest side (/init, job.sh)."""

HOST_ROOT_TAG = "hostroot"  # 9p tag of the host's / (read-only)
SHARE_TAG = "kgshare"  # 9p tag of the writable per-run share (the host's results directory)
GUEST_SHARE = "/run/kernel-guest"  # where the share is mounted inside the guest's root
JOB_SCRIPT = "job.sh"  # written by the host into the share, run by /init in the chroot
EXIT_FILE = "exit-code"  # written by /init into the share: the job's exit status
EXIT_MARKER = "KERNEL_GUEST_EXIT="  # console line with the job's exit status
START_MARKER = "KERNEL_GUEST_JOB_START"  # console line printed just before the job starts
TIMEOUT_MARKER = "KERNEL_GUEST_JOB_TIMEOUT"  # console line: the guest interrupted the job
TIMEOUT_PARAM = "kernel_guest.timeout"  # kernel command line: the job's limit in seconds
# Kernel command line: "1" keeps the host's /tmp (read-only lower, writes to the overlay)
# instead of a fresh tmpfs, because the job's directory (e.g. a CI checkout) lives there.
HOST_TMP_PARAM = "kernel_guest.host_tmp"
INIT_FAILURE_EXIT = 125  # /init could not set the guest up
JOB_TIMEOUT_EXIT = 124  # the job ran out of time (in the guest, or the host killed qemu)

# Environment the job sees (tests read these).
ENV_GUEST = "EDGE_GUEST"  # "1" inside the guest
ENV_DISKS = "EDGE_GUEST_DISKS"  # comma-separated block devices, e.g. /dev/vda,/dev/vdb
ENV_RESULTS = "EDGE_GUEST_RESULTS"  # a writable directory whose files come back to the host
