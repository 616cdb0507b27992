"""The CSI Controller service: volumes and snapshots as LVM logical volumes on this node.

Every RPC checks its arguments first (INVALID_ARGUMENT before any lookup), then takes its
in-flight keys (a concurrent call for the same name or volume gets ABORTED), then works.

Crash and fault safety (SIGKILL at any point, or a fault inside one LVM command, then restart
and retry, converges; see csi_lvm/finish.py, facts.py, inuse.py, recovery.py):
- Every LV is born `unfinished` (tag set by its own lvcreate): LVM commits the metadata before
  it wipes the LV, so a killed lvcreate can leave a tagged LV holding an earlier tenant's
  data. The driver finishes it (O_EXCL head/tail wipe, then the tag removed) before it answers
  (with device-mapper), or before anyone reads it: the first publish, a snapshot or clone of
  it, or a CreateVolume retry.
- A CreateVolume that must fill the LV (copy from a snapshot/volume, or zero a raw block
  volume) creates it `pending` too and removes both tags in one lvchange as its last step.
  A pending LV was never handed out: the retry (or the start-up sweep) removes and redoes it.
  Temporary snapshots used while cloning are kind=temporary and removed the same way.
- A snapshot is served only when LVM's facts (snapshot / thin volume, origin = the source)
  agree with its tags; a thick lvcreate killed between its two commits is removed and redone.
- DeleteVolume refuses a volume in use (FAILED_PRECONDITION: open, mounted, bound, held).
- A state-changing LVM command is never killed on timeout (ABORTED, volume kept locked until
  it ends); the start-up sweep refreshes LVs left suspended or half-resized.
The driver never lists, changes or removes an LV without its ownership tag.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from csi_lvm import blockdev, finish, inuse
from csi_lvm.capabilities import capability_error, is_block
from csi_lvm.capacity import (
    CapacityCache,
    PoolThresholds,
    ThinPoolSpace,
    max_striped_size,
    pool_problems,
    thin_refusal,
)
from csi_lvm.config import CreateWipe, CsiConfig, Mode
from csi_lvm.encryption import (
    CTX_ENCRYPTED,
    CTX_KEY_BACKEND,
    NewKey,
    VolumeEncryption,
    check_encryption_request,
    encryption_context,
    is_encrypted,
)
from csi_lvm.facts import snapshot_is_real
from csi_lvm.jobs import Caller, Jobs, Progress, max_job_waiters
from csi_lvm.locks import Held, InFlight, thin_pool_key
from csi_lvm.params import (
    P_WIPE,
    LvmType,
    VolumeParams,
    check_range,
    check_snapshot_params,
    choose_size,
    parse_snapshot_size,
    parse_volume_params,
    round_up,
    size_fits,
)
from csi_lvm.published import PublishedCapacity
from csi_lvm.volume import (
    KIND_SNAPSHOT,
    KIND_TEMPORARY,
    KIND_VOLUME,
    PLAIN_CONTEXT_KEYS,
    TAG_KIND,
    TAG_PENDING,
    TAG_PLAIN_DELETE,
    TAG_UNFINISHED,
    InvalidId,
    LvRef,
    Ownership,
    VolumeContext,
    build_tags,
    owner_tag,
    parse_id,
    read_tags,
    snapshot_lv_name,
    temporary_lv_name,
    volume_lv_name,
)
from csi_lvm.volume_keys import KeyBackends
from edge_common.devmapper import DmError
from edge_common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Unimplemented,
)
from edge_common.log import log_context
from edge_common.lvm import (
    LogicalVolume,
    Lvm,
    LvmCommandNotFound,
    LvmError,
    LvmReport,
    LvmStillRunning,
    LvmTimeout,
)
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 128
RPC = csi_pb2.ControllerServiceCapability.RPC

_HEALTH = {
    "p": "partial: a physical volume of the LV is missing",
    "r": "RAID refresh needed",
    "m": "RAID mismatches",
    "w": "RAID writemostly",
    "F": "failed",
    "D": "thin pool out of data space",
    "M": "thin pool metadata read-only",
    "E": "dm-writecache error",
}


def lvm_failure(exc: LvmError, doing: str) -> ServiceError:
    """One place that turns an LVM failure into a CSI status."""
    if isinstance(exc, LvmStillRunning):
        return Aborted(f"{doing}: {exc.message}; the volume stays locked until it ends, retry")
    if isinstance(exc, LvmTimeout):
        return Unavailable(f"{doing}: {exc.message}; the outcome is unknown, retry")
    if isinstance(exc, LvmCommandNotFound):
        return Unavailable(f"{doing}: {exc.message}")
    if exc.is_no_space():
        return ResourceExhausted(f"{doing}: not enough free space: {exc.message}")
    return Internal(f"{doing}: {exc.message}")


def _refusal(exc: LvmError) -> bool:
    """LVM ran and said no (not a timeout, a missing binary or a lack of space)."""
    return not isinstance(exc, (LvmTimeout, LvmCommandNotFound)) and not exc.is_no_space()


@contextlib.contextmanager
def lvm_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except LvmError as exc:
        raise lvm_failure(exc, doing) from exc


def _check_name(name: str, what: str) -> None:
    if not name:
        raise InvalidArgument(f"{what} is required")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_BYTES} bytes")


def _check_capabilities(caps: Sequence[csi_pb2.VolumeCapability]) -> None:
    if not caps:
        raise InvalidArgument("volume_capabilities is required")
    for cap in caps:
        err = capability_error(cap)
        if err:
            raise InvalidArgument(err)


def encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1\n{last_id}".encode()).decode()


def decode_token(token: str) -> str:
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    version, sep, last = text.partition("\n")
    if version != "v1" or not sep or not last:
        raise ServiceError(f"starting_token {token!r} was not issued by this driver",
                           grpc.StatusCode.ABORTED)
    return last


def _paginate(ids: list[str], max_entries: int, token: str) -> tuple[list[str], str]:
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    ids = sorted(ids)
    if token:
        last = decode_token(token)
        ids = [i for i in ids if i > last]
    if max_entries and len(ids) > max_entries:
        page = ids[:max_entries]
        return page, encode_token(page[-1])
    return ids, ""


def _timestamp(seconds: int | None) -> Timestamp:
    ts = Timestamp()
    ts.seconds = int(seconds or 0)
    return ts


def lv_condition(lv: LogicalVolume, pool: LogicalVolume | None = None,
                 thresholds: PoolThresholds | None = None) -> tuple[bool, str]:
    """(abnormal, message) from what LVM reports about the LV and, for a thin volume, its
    pool: a pool past a threshold makes every volume in it abnormal (writes may fail)."""
    problems = []
    if lv.attr.health in _HEALTH:
        problems.append(_HEALTH[lv.attr.health])
    if lv.attr.invalid_snapshot:
        problems.append("invalid snapshot (its copy-on-write space overflowed)")
    if pool is not None:
        pool_issues = pool_problems(pool, thresholds or PoolThresholds())
        if pool_issues:
            problems.append(f"thin pool {pool.vg_name}/{pool.name}: {'; '.join(pool_issues)}"
                            " (writes may fail)")
    if problems:
        return True, "; ".join(problems)
    return False, "volume is healthy"


@dataclass(frozen=True)
class Source:
    """A resolved content source (a snapshot or a volume of this driver)."""

    kind: str  # "snapshot" | "volume"
    ref: LvRef
    lv: LogicalVolume
    own: Ownership

    @property
    def tag(self) -> str:
        return f"{self.kind}:{self.ref.id}"

    @property
    def size(self) -> int:
        """The size a restore must have at least: the origin's size for snapshots."""
        if self.kind == KIND_SNAPSHOT and self.own.size:
            return self.own.size
        return self.lv.size


@dataclass(frozen=True)
class Plan:
    method: str  # "plain" | "thin-snapshot" | "copy"
    wipe: str  # "" | "header" | "full"
    encrypt: bool = False  # write a new LUKS2 header (the old bytes then read as noise)

    @property
    def pending(self) -> bool:
        return self.method != "plain" or self.wipe == "full" or self.encrypt


class Controller(csi_pb2_grpc.ControllerServicer):
    def __init__(self, config: CsiConfig, lvm: Lvm | None, cache: CapacityCache | None,
                 locks: InFlight | None = None,
                 published: PublishedCapacity | None = None, jobs: Jobs | None = None, *,
                 encryption: VolumeEncryption | None = None) -> None:
        self.cfg = config
        self.encryption = encryption or VolumeEncryption(KeyBackends(None))
        self.jobs = jobs or Jobs(config.max_data_jobs, config.data_job_wait_seconds,
                                 max_waiting=max_job_waiters(config))
        self.published = published  # mode controller: what the nodes publish
        self._lvm = lvm
        self._cache = cache
        self.locks = locks or InFlight()
        self.owner = owner_tag(config.driver_name)
        self.segments = {config.topology_key: config.node_id}
        self.thresholds = PoolThresholds.of(config)
        # Data operations (zeroing, copying, COW snapshots) need device-mapper.
        self.live = lvm is not None and not lvm.settings.activation_disabled
        # CSI names are global to the driver, not per VG: LV names this process created, by
        # VG, so that the same name asked for in another VG is recognised without an lvm
        # call (the capacity cache's report covers what existed before; see _elsewhere).
        self._made: dict[str, set[str]] = {}
        self._made_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers

    @property
    def lvm(self) -> Lvm:
        if self._lvm is None:
            raise Unimplemented("this instance runs in mode 'controller' (expansion only)")
        return self._lvm

    @property
    def cache(self) -> CapacityCache:
        if self._cache is None:
            raise Unimplemented("this instance runs in mode 'controller' (expansion only)")
        return self._cache

    def _topology(self) -> list[csi_pb2.Topology]:
        return [csi_pb2.Topology(segments=self.segments)]

    def _is_here(self, topology: csi_pb2.Topology) -> bool:
        segs = dict(topology.segments)
        return bool(segs) and all(self.segments.get(k) == v for k, v in segs.items())

    def _get(self, ref: LvRef) -> tuple[LogicalVolume, Ownership] | None:
        with lvm_errors(f"looking up {ref}"):
            lv = self.lvm.get_lv(ref.vg, ref.lv)
        if lv is None:
            return None
        return lv, read_tags(lv.tags, self.cfg.driver_name)

    def _get_owned(self, ref: LvRef, kind: str) -> tuple[LogicalVolume, Ownership] | None:
        found = self._get(ref)
        if found is None:
            return None
        lv, own = found
        if not own.owned or own.kind != kind or own.pending:
            return None
        if kind == KIND_SNAPSHOT and not snapshot_is_real(lv, own):
            log.warning("an unfinished snapshot leftover is not served", extra={"lv": ref.id})
            return None
        return lv, own

    def _owned_lvs(self) -> list[tuple[LogicalVolume, Ownership]]:
        return self._owned_lvs_and_pools()[0]

    def _owned_lvs_and_pools(self) -> tuple[list[tuple[LogicalVolume, Ownership]],
                                            dict[tuple[str, str], LogicalVolume]]:
        """Our LVs, and every thin pool by (vg, name), from one lvm call."""
        with lvm_errors("listing volumes"):
            lvs = self.lvm.lvs()
        pools = {(lv.vg_name, lv.name): lv for lv in lvs if lv.is_thin_pool}
        return ([(lv, read_tags(lv.tags, self.cfg.driver_name)) for lv in lvs
                 if self.owner in lv.tags], pools)

    def _remove(self, ref: LvRef, doing: str) -> None:
        try:
            self.lvm.lvremove(ref.vg, ref.lv)
        except LvmError as exc:
            if exc.is_in_use():
                raise FailedPrecondition(f"{doing}: LVM says it is in use: {exc.message}") \
                    from exc
            if not exc.is_not_found():
                raise lvm_failure(exc, doing) from exc
        finally:
            self.cache.invalidate()
        self._forget(ref)

    def _remember(self, ref: LvRef) -> None:
        with self._made_lock:
            self._made.setdefault(ref.lv, set()).add(ref.vg)

    def _forget(self, ref: LvRef) -> None:
        with self._made_lock:
            vgs = self._made.get(ref.lv)
            if vgs is not None:
                vgs.discard(ref.vg)
                if not vgs:
                    del self._made[ref.lv]

    def _elsewhere(self, ref: LvRef, kind: str, csi_name: str) -> LvRef | None:
        """The volume (or snapshot) of this CSI name in ANOTHER volume group, if any.

        A CSI name identifies one volume for the whole driver, whatever vgName the request
        carries, and the derived LV name is the same in every VG. Candidates come from memory
        (the capacity cache's last report, and what this process created since), so a create
        with no namesake anywhere costs no lvm call; each candidate is then checked with LVM.
        """
        with self._made_lock:
            candidates = set(self._made.get(ref.lv, ()))
        report = self._cache.cached() if self._cache is not None else None
        if report is not None:
            candidates.update(lv.vg_name for lv in report.lvs
                              if lv.name == ref.lv and self.owner in lv.tags)
        candidates.discard(ref.vg)
        for vg in sorted(candidates):
            other = LvRef(vg, ref.lv)
            found = self._get(other)
            if found is None:
                self._forget(other)
                continue
            _lv, own = found
            if own.owned and own.kind == kind and own.name == csi_name and not own.pending:
                return other
        return None

    def _pool_of(self, lv: LogicalVolume) -> LogicalVolume | None:
        """The thin pool of a thin volume, as LVM reports it now (a cached report would call a
        pool healthy for up to a refresh period after it filled up)."""
        if not lv.pool_lv:
            return None
        with lvm_errors(f"reading thin pool {lv.vg_name}/{lv.pool_lv}"):
            return self.lvm.get_lv(lv.vg_name, lv.pool_lv)

    def _condition(self, lv: LogicalVolume, pool: LogicalVolume | None) -> tuple[bool, str]:
        abnormal, message = lv_condition(lv, pool, self.thresholds)
        key_problem = self.encryption.problem(f"{lv.vg_name}/{lv.name}")
        if key_problem:  # an encrypted volume whose key cannot be unwrapped
            return True, key_problem if not abnormal else f"{message}; {key_problem}"
        return abnormal, message

    @contextlib.contextmanager
    def _thin_room(self, vg: str, pool: str, size: int, replacing: str = "") -> Iterator[None]:
        """Hold the pool's mutex, read the pool from LVM now (its overprovision tag, usage and
        thin LVs), and refuse a thin LV of `size` virtual bytes (in place of the pool's LV
        `replacing`, if it has one) when it does not fit: two requests can never both take
        the last room of a pool."""
        with self.locks.serial(thin_pool_key(vg, pool)):
            with lvm_errors(f"reading thin pool {vg}/{pool}"):
                report = self.cache.refresh()
            refusal = thin_refusal(report, vg, pool, size, replacing, self.cache.default_ratio,
                                   self.thresholds)
            if refusal is not None:
                raise ResourceExhausted(f"{refusal} on node {self.cfg.node_id}; another node "
                                        "may have room")
            yield

    def _volume_msg(self, ref: LvRef, lv: LogicalVolume, own: Ownership) -> csi_pb2.Volume:
        vol = csi_pb2.Volume(
            volume_id=ref.id,
            capacity_bytes=lv.size,
            volume_context=own.context,
            accessible_topology=self._topology(),
        )
        if own.source:
            vol.content_source.CopyFrom(self._source_msg(own.source))
        return vol

    @staticmethod
    def _source_msg(tag: str) -> csi_pb2.VolumeContentSource:
        kind, _, source_id = tag.partition(":")
        msg = csi_pb2.VolumeContentSource()
        if kind == KIND_SNAPSHOT:
            msg.snapshot.snapshot_id = source_id
        else:
            msg.volume.volume_id = source_id
        return msg

    # ------------------------------------------------------------------ capabilities

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext,
                                  ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        if self.cfg.mode is Mode.CONTROLLER:
            types = [RPC.EXPAND_VOLUME]
        else:
            types = [RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
                     RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
                     RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME, RPC.GET_VOLUME, RPC.VOLUME_CONDITION,
                     RPC.SINGLE_NODE_MULTI_WRITER]
            if self.cfg.advertise_get_snapshot:
                # Alpha in CSI 1.12: csi-sanity releases (and sidecars) built against older
                # specs fail on a capability they do not know, so it is opt-in.
                types.append(RPC.GET_SNAPSHOT)
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in types])

    # ------------------------------------------------------------------ CreateVolume

    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.CreateVolumeResponse:
        name = request.name
        _check_name(name, "name")
        caps = list(request.volume_capabilities)
        _check_capabilities(caps)
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        check_range(required, limit)
        mount_caps = [c for c in caps if not is_block(c)]
        params = parse_volume_params(
            {**request.parameters, **request.mutable_parameters},
            default_vg=self.cfg.default_vg,
            default_thin_pool=self.cfg.default_thin_pool,
            default_wipe=self.cfg.delete_wipe.value,
            capability_fs_types=[c.mount.fs_type for c in mount_caps],
            has_mount=bool(mount_caps),
        )
        source_kind, source_id = "", ""
        if request.HasField("volume_content_source"):
            which = request.volume_content_source.WhichOneof("type")
            if which == "snapshot":
                source_kind = KIND_SNAPSHOT
                source_id = request.volume_content_source.snapshot.snapshot_id
            elif which == "volume":
                source_kind = KIND_VOLUME
                source_id = request.volume_content_source.volume.volume_id
            else:
                raise InvalidArgument("volume_content_source names neither a snapshot nor a volume")
            if not source_id:
                raise InvalidArgument(f"volume_content_source: the {source_kind} id is empty")
        if not self.cfg.vg_allowed(params.vg):
            raise InvalidArgument(
                f"volume group {params.vg!r} is not allowed on node {self.cfg.node_id}: this "
                f"driver uses only its default VG {self.cfg.default_vg!r} and the VGs listed in "
                "the option allowed_vgs (--allowed-vgs / CSI_LVM_ALLOWED_VGS); add it there to "
                "use it")
        if params.encrypted and not source_kind:
            check_encryption_request(self.encryption, True, params.key_backend, None)
        req = request.accessibility_requirements
        if req.requisite and not any(self._is_here(t) for t in req.requisite):
            raise ResourceExhausted(
                f"this driver provisions on its own node only ({self.cfg.topology_key}="
                f"{self.cfg.node_id}), which is not among the requisite topologies")
        _ = self.lvm  # mode check before any lookup

        lv_name = volume_lv_name(name)
        ref = LvRef(params.vg, lv_name)
        shared = [f"lv:{source_id}"] if source_id else []
        caller = Caller.of(context)
        # Its copy still running: wait as long as the caller does, then ABORTED; never a second.
        self.jobs.check(ref.id, "create", caller)
        # The keys go to the background job when the fill outlasts this call (it releases
        # them when it ends); else they are released here.
        held = self.locks.take(f"volume-name:{name}", f"lv:{ref.id}", shared=shared)
        with held.scope(), log_context(volume_id=ref.id, volume_name=name):
            elsewhere = self._elsewhere(ref, KIND_VOLUME, name)
            if elsewhere is not None:
                raise AlreadyExists(
                    f"volume {name!r} already exists in volume group {elsewhere.vg} "
                    f"({elsewhere.id}); a name identifies one volume across all of this "
                    f"driver's volume groups, not {params.vg!r} too")
            self._remember(ref)
            with contextlib.ExitStack() as stack:
                vol = self._create_volume(stack, held, request, name, ref, params, caps,
                                          required, limit, source_kind, source_id, caller)
        return csi_pb2.CreateVolumeResponse(volume=vol)

    def _create_volume(self, stack: contextlib.ExitStack, held: Held,
                       request: csi_pb2.CreateVolumeRequest, name: str, ref: LvRef,
                       params: VolumeParams, caps: list[csi_pb2.VolumeCapability],
                       required: int, limit: int, source_kind: str, source_id: str,
                       caller: Caller) -> csi_pb2.Volume:
        with lvm_errors("reading the volume group"):
            vg = self.cache.vg(params.vg)
        if vg is None:
            raise ResourceExhausted(
                f"volume group {params.vg!r} does not exist on node {self.cfg.node_id}")
        source = self._resolve_source(source_kind, source_id) if source_kind else None
        if source is not None and source.kind == KIND_VOLUME and source.own.unfinished:
            self._finish(source.ref, source.lv)  # a clone must not copy foreign data
        ctx = params.context(ref.lv)
        key_backend = check_encryption_request(self.encryption, params.encrypted,
                                               params.key_backend,
                                               source.own.context if source else None)
        if key_backend:
            ctx.update({CTX_ENCRYPTED: "true", CTX_KEY_BACKEND: key_backend})
        source_tag = source.tag if source else ""

        stripes = None
        unit = vg.extent_size
        report = self.cache.report()
        pool: ThinPoolSpace | None = None
        try:
            if params.lvm_type is LvmType.STRIPED:
                pv_count = len(report.pvs_of(vg.name)) or vg.pv_count
                stripes = params.stripes or pv_count
                if stripes < 2 or stripes > pv_count:
                    raise ResourceExhausted(
                        f"{stripes} stripes need as many physical volumes; volume group "
                        f"{vg.name} has {pv_count}")
                unit = vg.extent_size * stripes
            size = choose_size(required, limit, unit, self.cfg.default_volume_size,
                               source.size if source else 0)

            if params.lvm_type is LvmType.THIN:
                assert params.thin_pool is not None
                # The caller holds the pool's mutex (CreateVolume): this reading stays true
                # until our lvcreate has run.
                stack.enter_context(
                    self._thin_room(vg.name, params.thin_pool, size, replacing=ref.lv))
                pool = self.cache.thin_pool(vg.name, params.thin_pool)
            else:
                largest = vg.size if stripes is None else max_striped_size_total(
                    report, vg.name, stripes)
                if size > largest:
                    raise ResourceExhausted(
                        f"{size} bytes exceed the largest volume volume group {vg.name} can "
                        f"hold on node {self.cfg.node_id} ({largest} bytes); another node may "
                        "have room")
        except (OutOfRange, ResourceExhausted):
            # A volume of this name that exists already answers first: a capacity the VG
            # could never hold is still ALREADY_EXISTS (or the volume itself) for it.
            found = self._get(ref)
            if found is not None:
                vol = self._existing(ref, found, name, required, limit, ctx, source_tag)
                if vol is not None:
                    return vol
            raise

        # Idempotency: the derived name is the key.
        plan = self._plan(params, caps, source, pool is not None and pool.pool.attr.zeroing)
        if key_backend and source is None:
            plan = Plan(plan.method, "", encrypt=True)
        if plan.pending:
            found = self._get(ref)
            if found is not None:
                vol = self._existing(ref, found, name, required, limit, ctx, source_tag)
                if vol is not None:
                    return vol
                self._discard_pending(ref, source)
        new_key = self.encryption.prepare(key_backend) if plan.encrypt else None
        tags = build_tags(self.cfg.driver_name, kind=KIND_VOLUME, csi_name=name,
                          created=int(time.time()), size=size, source=source_tag, context=ctx,
                          pending=plan.pending)
        if set(ctx) <= PLAIN_CONTEXT_KEYS:  # no wipe on delete, nothing else to undo
            tags.append(TAG_PLAIN_DELETE)
        for attempt in (1, 2):
            try:
                self._make_lv(ref, size, params, stripes, tags, plan, source)
                break
            except LvmError as exc:
                self.cache.invalidate()
                if not exc.is_already_exists() or attempt == 2:
                    raise lvm_failure(exc, f"creating {ref}") from exc
            found = self._get(ref)
            if found is None:
                raise Unavailable(f"{ref} vanished while being created; retry")
            vol = self._existing(ref, found, name, required, limit, ctx, source_tag)
            if vol is not None:
                return vol
            self._discard_pending(ref, source)
        self.cache.invalidate()
        stack.close()  # the new LV is in the pool's accounting now: the next create may read it
        log.info("volume created", extra={"size": size, "lvm_type": params.lvm_type.value,
                                          "method": plan.method})

        def fill(progress: Progress | None = None) -> None:
            self._populate(ref, size, plan, source, pool is not None, progress, new_key)
            if plan.pending and self.live:
                # Filled (copied or zeroed whole) by the driver itself: finished in the same
                # lvchange that ends `pending`.
                with lvm_errors(f"finishing {ref}"):
                    self.lvm.deltag(ref.vg, ref.lv, [TAG_PENDING, TAG_UNFINISHED])
            elif plan.pending:
                with lvm_errors(f"finishing {ref}"):
                    self.lvm.deltag(ref.vg, ref.lv, [TAG_PENDING])
            elif self.live:
                # _populate made it safe (head and tail zeroed; a thin volume needs nothing):
                # finished before it is handed out, so whatever is written into it from now on
                # is never wiped by a first use. Without device-mapper it cannot be made safe
                # here: its first activation (NodePublishVolume) finishes it.
                with lvm_errors(f"finishing {ref}"):
                    self.lvm.deltag(ref.vg, ref.lv, [TAG_UNFINISHED])

        def discard() -> None:
            log.warning("filling the new volume failed; removing it")
            with contextlib.suppress(Exception):
                self._discard_pending(ref, source)

        if self.live and (plan.method == "copy" or plan.wipe == "full"):
            # Minutes for a large volume: a background job, not this gRPC worker.
            self.jobs.run(ref.id, "create", "copy" if plan.method == "copy" else "wipe", size, fill,
                          held, on_failure=discard, caller=caller)
        else:
            try:
                fill()
            except BaseException:
                discard()
                raise
        vol = csi_pb2.Volume(volume_id=ref.id, capacity_bytes=size, volume_context=ctx,
                             accessible_topology=self._topology())
        if request.HasField("volume_content_source"):
            vol.content_source.CopyFrom(request.volume_content_source)
        return vol

    def _resolve_source(self, kind: str, source_id: str) -> Source:
        try:
            ref = parse_id(source_id)
        except InvalidId:
            raise NotFound(f"{kind} {source_id!r} does not exist") from None
        found = self._get_owned(ref, kind)
        if found is None:
            raise NotFound(f"{kind} {source_id} does not exist on node {self.cfg.node_id}")
        return Source(kind, ref, *found)

    def _plan(self, params: VolumeParams, caps: list[csi_pb2.VolumeCapability],
              source: Source | None, zeroing_pool: bool) -> Plan:
        if source is not None:
            same_pool = (params.lvm_type is LvmType.THIN and source.lv.is_thin
                         and source.ref.vg == params.vg and source.lv.pool_lv == params.thin_pool)
            if same_pool:
                return Plan("thin-snapshot", "")
            if not self.live:
                raise ServiceError(
                    "copying a volume needs device-mapper, which this kernel lacks",
                    grpc.StatusCode.FAILED_PRECONDITION)
            return Plan("copy", "")
        if zeroing_pool:
            return Plan("plain", "")  # the pool zeroes every block it provisions
        policy = self.cfg.create_wipe
        if policy is CreateWipe.FULL or (policy is CreateWipe.AUTO and any(map(is_block, caps))):
            return Plan("plain", "full")
        return Plan("plain", "header")

    def _existing(self, ref: LvRef, found: tuple[LogicalVolume, Ownership], name: str,
                  required: int, limit: int, ctx: dict[str, str],
                  source_tag: str) -> csi_pb2.Volume | None:
        """The response for an LV that already has our derived name, or None when it is a
        pending leftover of a crashed attempt (to be removed and redone)."""
        lv, own = found
        if not own.owned:
            raise AlreadyExists(f"logical volume {ref} exists and is not managed by "
                                f"{self.cfg.driver_name}")
        if own.kind != KIND_VOLUME or own.name != name:
            raise AlreadyExists(f"logical volume {ref} belongs to another {own.kind or 'LV'}")
        if own.pending:
            log.warning("found an unfinished volume from an interrupted attempt; redoing it")
            return None
        if own.source != source_tag:
            raise AlreadyExists(f"volume {name!r} exists with another content source "
                                f"({own.source or 'none'})")
        if own.context != ctx:
            raise AlreadyExists(f"volume {name!r} exists with other parameters "
                                f"({own.context})")
        if not size_fits(lv.size, required, limit):
            raise AlreadyExists(f"volume {name!r} exists with {lv.size} bytes, outside the "
                                f"requested capacity range")
        if own.unfinished:
            self._finish(ref, lv)
        return self._volume_msg(ref, lv, own)

    def _finish(self, ref: LvRef, lv: LogicalVolume) -> None:
        """Make an unfinished volume (never used: e.g. its lvcreate was killed before its own
        wipe) safe and mark it finished; without device-mapper its first activation will."""
        if not self.live:
            return
        log.info("finishing a volume that was never made safe", extra={"volume_id": ref.id})
        with lvm_errors(f"activating {ref} to finish it"):
            if not lv.is_active:
                self.lvm.activate(ref.vg, ref.lv, ignore_skip=True)
        try:
            with lvm_errors(f"finishing {ref}"):
                finish.finish(self.lvm, ref, lv.size, thin=lv.is_thin)
        except blockdev.DeviceBusy as exc:
            raise FailedPrecondition(f"volume {ref} was never finished and is in use: "
                                     f"{exc}") from exc
        except blockdev.BlockDeviceError as exc:
            raise Internal(f"finishing {ref}: {exc}") from exc
        finally:
            self.cache.invalidate()

    def _discard_pending(self, ref: LvRef, source: Source | None) -> None:
        """Remove an unfinished volume and its temporary snapshot (never handed out)."""
        for vg in dict.fromkeys([ref.vg, *([source.ref.vg] if source else [])]):
            tmp = LvRef(vg, temporary_lv_name(ref.lv))
            found = self._get(tmp)
            if found is not None and found[1].owned and found[1].kind == KIND_TEMPORARY:
                self._remove(tmp, f"removing the temporary snapshot {tmp}")
        found = self._get(ref)
        if found is not None:
            if not found[1].owned or not found[1].pending:
                raise Internal(f"refusing to remove {ref}: not an unfinished volume of ours")
            self._remove(ref, f"removing the unfinished volume {ref}")

    def _make_lv(self, ref: LvRef, size: int, params: VolumeParams, stripes: int | None,
                 tags: list[str], plan: Plan, source: Source | None) -> None:
        if plan.method == "thin-snapshot":
            assert source is not None
            self.lvm.create_snapshot(ref.vg, source.ref.lv, ref.lv, tags=tags)
            if size > source.lv.size:
                self.lvm.lvextend(ref.vg, ref.lv, size)
            return
        self.lvm.lvcreate(ref.vg, ref.lv, size, tags=tags, stripes=stripes,
                          stripe_size=params.stripe_size, thin_pool=params.thin_pool)

    def _populate(self, ref: LvRef, size: int, plan: Plan, source: Source | None,
                  thin: bool, progress: Progress | None = None,
                  new_key: NewKey | None = None) -> None:
        if not self.live:
            if plan.wipe or plan.method != "plain":
                log.info("no device-mapper: the LV is inactive and cannot be written here")
            return
        path = ref.device_path
        if new_key is not None:
            blockdev.wait_for_device(path)
            self.encryption.format(ref.id, path, new_key)
        if plan.method == "thin-snapshot":
            with lvm_errors(f"activating {ref}"):
                self.lvm.activate(ref.vg, ref.lv, ignore_skip=True)
            return
        blockdev.wait_for_device(path)
        if plan.method == "copy":
            assert source is not None
            self._copy_from(source, ref, size, thin, progress)
        elif plan.wipe == "full":
            blockdev.zero_range(path, 0, size, progress=progress)
        elif plan.wipe == "header":
            blockdev.zero_head_and_tail(path, size)

    def _copy_from(self, source: Source, target: LvRef, size: int, thin_target: bool,
                   progress: Progress | None = None) -> None:
        if not (source.kind == KIND_VOLUME
                and (source.lv.is_thin or self.cfg.clone_via_snapshot)):
            # A snapshot is read as it is; a volume without a snapshot as it is now.
            self._copy_image(source, source.ref, target, size, thin_target, progress,
                             activate=not source.lv.is_active)
            return
        # A snapshot gives a consistent image while the source stays in use. A thick one gets
        # a copy-on-write area as large as the source (nothing the origin writes can overflow
        # it) when the VG has the room; a smaller one that overflows is retried larger.
        cow = None if source.lv.is_thin else self._cow_size(source, 0)
        temporary = LvRef(source.ref.vg, temporary_lv_name(target.lv))
        while True:
            tags = build_tags(self.cfg.driver_name, kind=KIND_TEMPORARY,
                              csi_name=f"clone:{target.id}", created=int(time.time()))
            with lvm_errors(f"creating the temporary snapshot {temporary}"):
                self.lvm.create_snapshot(source.ref.vg, source.ref.lv, temporary.lv,
                                         size_bytes=cow, tags=tags)
            self.cache.invalidate()
            overflowed = False
            try:
                try:
                    self._copy_image(source, temporary, target, size, thin_target, progress,
                                     activate=source.lv.is_thin)
                except (OSError, blockdev.BlockDeviceError):
                    overflowed = cow is not None and self._overflowed(temporary)
                    if not overflowed:
                        raise
                else:
                    overflowed = cow is not None and self._overflowed(temporary)
            finally:
                self._remove(temporary, f"removing the temporary snapshot {temporary}")
            if not overflowed:
                return
            assert cow is not None
            larger = self._cow_size(source, cow)
            if larger <= cow:
                raise Unavailable(
                    f"source volume {source.ref} changed more than its {cow}-byte copy-on-write "
                    "area holds while it was copied, and its volume group has no room for a "
                    "larger one; retry when it is less busy")
            log.warning("the source changed faster than the copy-on-write area held; copying "
                        "again with a larger one", extra={"cow_bytes": cow, "next": larger})
            if thin_target and not blockdev.discard(target.device_path, size):
                # The next copy skips zero chunks: the target must read as zeros again.
                blockdev.zero_range(target.device_path, 0, size)
            cow = larger

    def _cow_size(self, source: Source, tried: int) -> int:
        """COW bytes for a temporary snapshot of a thick source: its size plus an extent of
        exception metadata (it can then never overflow), else 4x what overflowed, else what
        the VG has free."""
        with lvm_errors("reading the volume group"):
            vg = self.cache.vg(source.ref.vg, fresh=True)
        extent = vg.extent_size if vg else 4 << 20
        full = round_up(source.lv.size + extent, extent)
        wanted = full if not tried else min(full, 4 * tried)
        free = vg.free if vg else wanted
        return max(extent, min(wanted, free // extent * extent))

    def _overflowed(self, snapshot: LvRef) -> bool:
        with lvm_errors(f"reading the temporary snapshot {snapshot}"):
            lv = self.lvm.get_lv(snapshot.vg, snapshot.lv)
        return lv is not None and (lv.attr.invalid_snapshot or (lv.data_percent or 0) >= 100)

    def _copy_image(self, source: Source, read_ref: LvRef, target: LvRef, size: int,
                    thin_target: bool, progress: Progress | None, *, activate: bool) -> None:
        # Thin snapshots (ours, or a thin temporary) skip activation; a thick COW snapshot
        # is active with its origin.
        if activate:
            with lvm_errors(f"activating {read_ref}"):
                self.lvm.activate(read_ref.vg, read_ref.lv, ignore_skip=True)
        blockdev.wait_for_device(read_ref.device_path)
        length = source.size
        blockdev.copy(read_ref.device_path, target.device_path, length,
                      skip_zero_chunks=thin_target, progress=progress)
        if size > length and not thin_target:
            blockdev.zero_range(target.device_path, length, size - length)
        if progress is not None:
            progress(size)

    # ------------------------------------------------------------------ DeleteVolume

    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        _ = self.lvm
        try:
            ref = parse_id(request.volume_id)
        except InvalidId:
            return csi_pb2.DeleteVolumeResponse()  # cannot exist: already deleted
        caller = Caller.of(context)
        self.jobs.check(ref.id, "delete", caller)  # its wipe still running: wait, or ABORTED
        held = self.locks.take(f"lv:{ref.id}")
        with held.scope(), log_context(volume_id=ref.id):
            self._delete_volume(ref, held, caller)
        return csi_pb2.DeleteVolumeResponse()

    def _delete_volume(self, ref: LvRef, held: Held, caller: Caller) -> None:
        if self._removed_at_once(ref):
            return
        found = self._get(ref)
        if found is None:
            return
        lv, own = found
        if not own.owned or own.kind != KIND_VOLUME:
            log.info("DeleteVolume for an LV this driver does not own: nothing to do")
            return
        if lv.attr.origin:
            raise ServiceError(
                f"volume {ref} has copy-on-write snapshots; delete them first",
                grpc.StatusCode.FAILED_PRECONDITION)
        if is_encrypted(own.context):
            # A mapping left open by a crash, used by nothing, is not "in use".
            self.encryption.close_idle(ref.id)
        self._refuse_in_use(ref)
        if is_encrypted(own.context):
            self._crypto_erase(ref, lv)  # before any wipe: the extents are noise from here
        wipe = own.context.get(P_WIPE, "none")
        wiping = wipe != "none" and not own.pending and not own.unfinished

        def wipe_and_remove(progress: Progress | None = None) -> None:
            if wiping:
                self._wipe(ref, lv, wipe, progress)
            self._remove(ref, f"removing {ref}")
            log.info("volume deleted", extra={"wipe": wipe if wiping else "none"})

        if self.live and wiping and wipe == "zero" and not lv.is_thin:
            # Zeroing every extent takes minutes on a large LV: a background job.
            self.jobs.run(ref.id, "delete", "wipe", lv.size, wipe_and_remove, held,
                          caller=caller)
        else:
            wipe_and_remove()

    def _removed_at_once(self, ref: LvRef) -> bool:
        """Delete at the speed of lvremove: ONE `lvremove --select` that matches only our own
        plain-delete volume (owner, kind and plain-delete tags; no thick snapshot origin).
        False sends the caller down the full path (lookup, checks, wipe, lvremove): nothing
        matched, LVM refused, or the volume may be in use."""
        if not self._may_remove_at_once(ref):
            return False
        tags = [self.owner, TAG_KIND + KIND_VOLUME, TAG_PLAIN_DELETE]
        try:
            removed = self.lvm.lvremove_if_tagged(ref.vg, ref.lv, tags)
        except LvmError as exc:
            if not _refusal(exc):
                raise lvm_failure(exc, f"removing {ref}") from exc
            log.info("one-step removal refused; taking the full path",
                     extra={"error": exc.message})
            return False
        finally:
            self.cache.invalidate()
        if removed:
            self._forget(ref)
            log.info("volume deleted", extra={"wipe": "none", "path": "one lvremove"})
        return removed

    def _may_remove_at_once(self, ref: LvRef) -> bool:
        """The in-use checks, which need no LVM process, decide first: a volume that is open,
        mounted, published or held (or whose state the kernel does not tell) takes the full
        path, which refuses it with FAILED_PRECONDITION (or UNAVAILABLE) after the lookup."""
        try:
            return not inuse.volume_usage(ref.vg, ref.lv).in_use
        except (DmError, OSError):
            return False

    def _refuse_in_use(self, ref: LvRef) -> None:
        """FAILED_PRECONDITION (the spec's code for "in use") when the volume is open, mounted,
        published or held: nothing is wiped or removed."""
        try:
            usage = inuse.volume_usage(ref.vg, ref.lv)
        except (DmError, OSError) as exc:
            raise Unavailable(f"cannot tell whether {ref} is in use: {exc}") from exc
        if usage.in_use:
            raise FailedPrecondition(f"volume {ref} is in use ({usage.describe()}); unpublish "
                                     "it and stop what uses it, then retry")

    def _writable(self, ref: LvRef, lv: LogicalVolume, doing: str) -> bool:
        """Activate the LV for a last write before lvremove; False without device-mapper."""
        if not self.live:
            log.warning("no device-mapper: the LV cannot be written before removal",
                        extra={"skipped": doing})
            return False
        if not lv.is_active:
            with lvm_errors(f"activating {ref} to {doing}"):
                self.lvm.activate(ref.vg, ref.lv, ignore_skip=True)
        return True

    def _crypto_erase(self, ref: LvRef, lv: LogicalVolume) -> None:
        """Key slots, key token and header zeroed before lvremove: the extents keep noise."""
        if not self._writable(ref, lv, "erase its key"):
            return
        try:
            blockdev.wait_for_device(ref.device_path)
        except blockdev.BlockDeviceError as exc:
            raise Internal(f"erasing the key of {ref}: {exc}") from exc
        self.encryption.crypto_erase(ref.id, ref.device_path, lv.size)

    def _wipe(self, ref: LvRef, lv: LogicalVolume, how: str,
              progress: Progress | None = None) -> None:
        if not self._writable(ref, lv, "wipe the data"):
            return
        try:
            blockdev.wait_for_device(ref.device_path)
            if how == "discard" or lv.is_thin:
                # Thin: discarding returns the blocks to the pool (zeroing would allocate them).
                if not blockdev.discard(ref.device_path, lv.size) and not lv.is_thin:
                    blockdev.zero_range(ref.device_path, 0, lv.size)
            else:
                blockdev.zero_range(ref.device_path, 0, lv.size, progress=progress)
        except blockdev.DeviceBusy as exc:
            raise FailedPrecondition(f"volume {ref} is in use: {exc}") from exc
        except blockdev.BlockDeviceError as exc:
            raise Internal(f"wiping {ref} before removal: {exc}") from exc

    # ------------------------------------------------------------------ Expand

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext,
                               ) -> csi_pb2.ControllerExpandVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        check_range(required, limit)
        if not required and not limit:
            raise InvalidArgument("capacity_range needs required_bytes or limit_bytes")
        if request.HasField("volume_capability"):
            err = capability_error(request.volume_capability)
            if err:
                raise InvalidArgument(err)
        block = request.HasField("volume_capability") and is_block(request.volume_capability)
        if self.cfg.mode is Mode.CONTROLLER:
            # The central instance has no LVM: the node grows the LV and the filesystem; what
            # the node publishes bounds the request here already.
            self._check_published(request.volume_id, required or limit)
            return csi_pb2.ControllerExpandVolumeResponse(
                capacity_bytes=required or limit, node_expansion_required=True)
        try:
            ref = parse_id(request.volume_id)
        except InvalidId:
            raise NotFound(f"volume {request.volume_id!r} does not exist") from None
        with log_context(volume_id=ref.id), self.locks.hold(f"lv:{ref.id}"):
            found = self._get_owned(ref, KIND_VOLUME)
            if found is None:
                raise NotFound(f"volume {ref} does not exist")
            lv, own = found
            if not request.HasField("volume_capability"):
                block = not own.context.get(VolumeContext.FS_TYPE)
            with lvm_errors("reading the volume group"):
                vg = self.cache.vg(ref.vg)
            unit = (vg.extent_size if vg else 4 << 20) * max(1, lv.stripes)
            size = choose_size(required or lv.size, limit, unit, lv.size)
            if size > lv.size:
                with contextlib.ExitStack() as stack:
                    if lv.is_thin and lv.pool_lv:
                        stack.enter_context(self._thin_room(ref.vg, lv.pool_lv, size,
                                                            replacing=ref.lv))
                    elif vg is not None and size - lv.size > vg.size:
                        raise ResourceExhausted(
                            f"growing {ref} to {size} bytes needs {size - lv.size} more, more "
                            f"than volume group {vg.name} holds ({vg.size} bytes)")
                    self._extend(ref, lv, size)
                log.info("volume expanded", extra={"size": size})
            else:
                size = lv.size
        # An encrypted block volume still needs the node: its dm-crypt mapping grows there.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=not block or is_encrypted(own.context))

    def _check_published(self, volume_id: str, size: int) -> None:
        if self.published is None:
            return
        room = self.published.room(volume_id)
        growth = size - room.current
        if room.maximum is None:
            log.info("no CSIStorageCapacity published for the volume's node: its node decides",
                     extra={"node": room.node, "storage_class": room.storage_class})
        elif growth > room.maximum:
            raise ResourceExhausted(
                f"growing {volume_id} from {room.current} to {size} bytes needs {growth} more; "
                f"node {room.node} publishes room for {room.maximum} bytes "
                f"(CSIStorageCapacity of StorageClass {room.storage_class})")

    def _extend(self, ref: LvRef, lv: LogicalVolume, size: int) -> None:
        try:
            self.lvm.lvextend(ref.vg, ref.lv, size)
        except LvmError as exc:
            if lv.attr.origin and not lv.is_thin and _refusal(exc):
                raise FailedPrecondition(
                    f"volume {ref} has copy-on-write snapshots and LVM refuses to grow "
                    f"it while they exist ({exc.message}); delete its snapshots, "
                    "then retry the expansion") from exc
            raise lvm_failure(exc, f"extending {ref}") from exc
        finally:
            self.cache.invalidate()

    # ------------------------------------------------------------------ Validate

    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext,
                                   ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        caps = list(request.volume_capabilities)
        if not caps:
            raise InvalidArgument("volume_capabilities is required")
        _ = self.lvm
        own = self._resolve_source(KIND_VOLUME, request.volume_id).own
        fs_type = own.context.get(VolumeContext.FS_TYPE, "")
        for cap in caps:
            err = capability_error(cap)
            if err is None and not is_block(cap) and cap.mount.fs_type and fs_type \
                    and cap.mount.fs_type != fs_type:
                err = f"the volume was created for {fs_type}, not {cap.mount.fs_type}"
            if err:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=err)
        for key, value in request.volume_context.items():
            if key in own.context and own.context[key] != value:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(
                    message=f"volume_context {key}={value!r} does not match the volume")
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=caps,
            parameters=request.parameters, mutable_parameters=request.mutable_parameters)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    # ------------------------------------------------------------------ List / Get

    def ListVolumes(self, request: csi_pb2.ListVolumesRequest,
                    context: grpc.ServicerContext) -> csi_pb2.ListVolumesResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        _ = self.lvm
        if request.starting_token:
            decode_token(request.starting_token)
        owned, pools = self._owned_lvs_and_pools()
        volumes = {
            f"{lv.vg_name}/{lv.name}": (lv, own) for lv, own in owned
            if own.kind == KIND_VOLUME and not own.pending
        }
        page, next_token = _paginate(list(volumes), request.max_entries, request.starting_token)
        entries = []
        for volume_id in page:
            lv, own = volumes[volume_id]
            pool = pools.get((lv.vg_name, lv.pool_lv)) if lv.pool_lv else None
            abnormal, message = self._condition(lv, pool)
            entries.append(csi_pb2.ListVolumesResponse.Entry(
                volume=self._volume_msg(LvRef(lv.vg_name, lv.name), lv, own),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    volume_condition=csi_pb2.VolumeCondition(abnormal=abnormal,
                                                             message=message))))
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext,
                            ) -> csi_pb2.ControllerGetVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        _ = self.lvm
        found = self._resolve_source(KIND_VOLUME, request.volume_id)
        ref, lv, own = found.ref, found.lv, found.own
        abnormal, message = self._condition(lv, self._pool_of(lv))
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume_msg(ref, lv, own),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=csi_pb2.VolumeCondition(abnormal=abnormal, message=message)))

    # ------------------------------------------------------------------ GetCapacity

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetCapacityResponse:
        caps = list(request.volume_capabilities)
        mount_caps = [c for c in caps if not is_block(c)]
        params = parse_volume_params(
            request.parameters, default_vg=self.cfg.default_vg,
            default_thin_pool=self.cfg.default_thin_pool,
            default_wipe=self.cfg.delete_wipe.value,
            capability_fs_types=[c.mount.fs_type for c in mount_caps] if caps else [],
            has_mount=bool(mount_caps),
        ) if caps or request.parameters else None
        cache = self.cache
        zero = csi_pb2.GetCapacityResponse(available_capacity=0)
        if any(capability_error(c) for c in caps):
            return zero
        if request.HasField("accessible_topology") and request.accessible_topology.segments \
                and not self._is_here(request.accessible_topology):
            return zero
        vg_name = params.vg if params else self.cfg.default_vg
        if not self.cfg.vg_allowed(vg_name):
            return zero
        with lvm_errors("reading capacity"):
            # A VG or pool missing from the cache is looked up in LVM again (rate-limited):
            # one the node agent just built is published within seconds.
            vg = cache.vg(vg_name, fresh=True)
            pool = cache.thin_pool(vg_name, params.thin_pool or "", fresh=True) \
                if vg is not None and params is not None and params.lvm_type is LvmType.THIN \
                else None
            report = cache.report(fresh=True)
        if vg is None:
            return zero
        resp = csi_pb2.GetCapacityResponse()
        if params is not None and params.lvm_type is LvmType.THIN:
            if pool is None:
                return zero
            # Pool size x overprovision ratio - virtual sizes handed out; 0 past a threshold.
            resp.available_capacity = pool.available
            resp.maximum_volume_size.value = pool.maximum
        elif params is not None and params.lvm_type is LvmType.STRIPED:
            stripes = params.stripes or len(report.pvs_of(vg_name))
            resp.available_capacity = vg.free if stripes >= 2 else 0
            resp.maximum_volume_size.value = max_striped_size(report, vg, stripes)
        else:
            resp.available_capacity = vg.free
            resp.maximum_volume_size.value = vg.free
        resp.minimum_volume_size.value = vg.extent_size
        return resp

    # ------------------------------------------------------------------ Snapshots

    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.CreateSnapshotResponse:
        name = request.name
        _check_name(name, "name")
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        check_snapshot_params(request.parameters)
        _ = self.lvm
        try:
            src = parse_id(request.source_volume_id)
        except InvalidId:
            raise NotFound(f"volume {request.source_volume_id!r} does not exist") from None
        ref = LvRef(src.vg, snapshot_lv_name(name))
        source_tag = f"{KIND_VOLUME}:{src.id}"
        with log_context(snapshot_id=ref.id, volume_id=src.id, snapshot_name=name), \
                self.locks.hold(f"snapshot-name:{name}", f"lv:{ref.id}", shared=[f"lv:{src.id}"]):
            elsewhere = self._elsewhere(ref, KIND_SNAPSHOT, name)
            if elsewhere is not None:
                raise AlreadyExists(
                    f"snapshot {name!r} already exists in volume group {elsewhere.vg} "
                    f"({elsewhere.id}), for another source volume than {src.id}")
            found = self._get(ref)
            if found is not None:
                lv, own = found
                if not own.owned or own.kind != KIND_SNAPSHOT or own.name != name:
                    raise AlreadyExists(f"logical volume {ref} exists and is not snapshot "
                                        f"{name!r} of this driver")
                if own.source != source_tag:
                    raise AlreadyExists(f"snapshot {name!r} exists for another volume "
                                        f"({own.source_id})")
                if not snapshot_is_real(lv, own):
                    log.warning("found an unfinished snapshot (not what its tags claim, "
                                "per LVM); removing and redoing it")
                    self._remove(ref, f"removing the unfinished snapshot {ref}")
                else:
                    if own.unfinished:
                        with lvm_errors(f"finishing snapshot {ref}"):
                            self.lvm.deltag(ref.vg, ref.lv, [TAG_UNFINISHED])
                    return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_msg(ref, lv,
                                                                                      own))
            source = self._get_owned(src, KIND_VOLUME)
            if source is None:
                raise NotFound(f"volume {src} does not exist on node {self.cfg.node_id}")
            origin, origin_own = source
            if origin_own.unfinished:
                self._finish(src, origin)  # a snapshot must not capture foreign data
            created = int(time.time())
            # A snapshot of an encrypted volume is encrypted too (the same LUKS2 header).
            tags = build_tags(self.cfg.driver_name, kind=KIND_SNAPSHOT, csi_name=name,
                              created=created, size=origin.size, source=source_tag,
                              context=encryption_context(origin_own.context))
            cow: int | None = None
            if not origin.is_thin:
                if not self.live:
                    raise ServiceError(
                        "thick (copy-on-write) snapshots need device-mapper, which this kernel "
                        "lacks", grpc.StatusCode.FAILED_PRECONDITION)
                with lvm_errors("reading the volume group"):
                    vg = self.cache.vg(src.vg)
                extent = vg.extent_size if vg else 4 << 20
                cow = parse_snapshot_size(request.parameters, origin.size, extent,
                                          self.cfg.thick_snapshot_percent)
            with contextlib.ExitStack() as stack:
                if origin.is_thin and origin.pool_lv:
                    # A thin snapshot is promised its origin's whole virtual size too.
                    stack.enter_context(self._thin_room(src.vg, origin.pool_lv, origin.size,
                                                        replacing=ref.lv))
                try:
                    self.lvm.create_snapshot(src.vg, src.lv, ref.lv, size_bytes=cow, tags=tags)
                    # lvcreate answered: it is a complete snapshot. Finished = its facts may be
                    # trusted even once the origin is gone (a thin snapshot outlives it).
                    self.lvm.deltag(ref.vg, ref.lv, [TAG_UNFINISHED])
                except LvmError as exc:
                    raise lvm_failure(exc, f"creating snapshot {ref}") from exc
                finally:
                    self.cache.invalidate()
            self._remember(ref)
            log.info("snapshot created", extra={"thin": cow is None, "cow_bytes": cow})
            snap = csi_pb2.Snapshot(size_bytes=origin.size, snapshot_id=ref.id,
                                    source_volume_id=src.id, creation_time=_timestamp(created),
                                    ready_to_use=True)
        return csi_pb2.CreateSnapshotResponse(snapshot=snap)

    def _snapshot_msg(self, ref: LvRef, lv: LogicalVolume, own: Ownership) -> csi_pb2.Snapshot:
        return csi_pb2.Snapshot(
            size_bytes=own.size or lv.size, snapshot_id=ref.id, source_volume_id=own.source_id,
            creation_time=_timestamp(own.created), ready_to_use=not lv.attr.invalid_snapshot)

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.DeleteSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        _ = self.lvm
        try:
            ref = parse_id(request.snapshot_id)
        except InvalidId:
            return csi_pb2.DeleteSnapshotResponse()
        with log_context(snapshot_id=ref.id), self.locks.hold(f"lv:{ref.id}"):
            found = self._get(ref)
            if found is None:
                return csi_pb2.DeleteSnapshotResponse()
            _lv, own = found
            if not own.owned or own.kind != KIND_SNAPSHOT:
                return csi_pb2.DeleteSnapshotResponse()
            self._remove(ref, f"removing snapshot {ref}")
            log.info("snapshot deleted")
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest,
                      context: grpc.ServicerContext) -> csi_pb2.ListSnapshotsResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        _ = self.lvm
        if request.starting_token:
            decode_token(request.starting_token)
        if request.snapshot_id:
            try:
                parse_id(request.snapshot_id)
            except InvalidId:
                return csi_pb2.ListSnapshotsResponse()
        snapshots = {}
        for lv, own in self._owned_lvs():
            if own.kind != KIND_SNAPSHOT or not snapshot_is_real(lv, own):
                continue
            ref = LvRef(lv.vg_name, lv.name)
            if request.snapshot_id and ref.id != request.snapshot_id:
                continue
            if request.source_volume_id and own.source_id != request.source_volume_id:
                continue
            snapshots[ref.id] = (ref, lv, own)
        page, next_token = _paginate(list(snapshots), request.max_entries,
                                     request.starting_token)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(
                snapshot=self._snapshot_msg(*snapshots[i])) for i in page],
            next_token=next_token)

    def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        _ = self.lvm
        try:
            ref = parse_id(request.snapshot_id)
        except InvalidId:
            raise NotFound(f"snapshot {request.snapshot_id!r} does not exist") from None
        found = self._get_owned(ref, KIND_SNAPSHOT)
        if found is None:
            raise NotFound(f"snapshot {ref} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=self._snapshot_msg(ref, *found))

    # ------------------------------------------------------------------ not offered

    def ControllerPublishVolume(self, request: csi_pb2.ControllerPublishVolumeRequest,
                                context: grpc.ServicerContext,
                                ) -> csi_pb2.ControllerPublishVolumeResponse:
        raise Unimplemented("local volumes need no attach step (attachRequired: false)")

    def ControllerUnpublishVolume(self, request: csi_pb2.ControllerUnpublishVolumeRequest,
                                  context: grpc.ServicerContext,
                                  ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        raise Unimplemented("local volumes need no attach step (attachRequired: false)")

    def ControllerModifyVolume(self, request: csi_pb2.ControllerModifyVolumeRequest,
                               context: grpc.ServicerContext,
                               ) -> csi_pb2.ControllerModifyVolumeResponse:
        raise Unimplemented("no mutable parameters are supported (MODIFY_VOLUME not offered)")


def max_striped_size_total(report: LvmReport, vg_name: str, stripes: int) -> int:
    """The largest striped LV by PV *sizes* (not free space): the OUT_OF_RANGE bound."""
    sizes = sorted((pv.size for pv in report.pvs_of(vg_name)), reverse=True)
    if len(sizes) < stripes:
        return 0
    return sizes[stripes - 1] * stripes
