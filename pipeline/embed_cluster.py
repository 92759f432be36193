"""The dask side of the embed stage: the client (a LocalCluster, or an existing ``--scheduler``), the device
its workers embed on, and each worker's warm-up and GPU.

With ``--scheduler`` the workers, not the host that submits the run (often a login node without a GPU),
settle ``--device``: `cluster_device` asks each worker how many CUDA devices it sees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time

from pipeline.errors import UsageError
from pipeline.signals import handling

log = logging.getLogger(__name__)

# On the scheduler, per run (keyed by its store): {"slots": {worker: slot}, "visible": {worker:
# CUDA_VISIBLE_DEVICES}, "own_list_hosts": [host]}, for the workers that join later (`claim_late_slot`).
SLOTS_KEY = "unclip-embed-gpu-slots"
WORKER_POLL_S = 1.0  # how often a run with no worker able to take its shards asks the scheduler again


def connect(cfg) -> tuple:
    """(client, cluster): a LocalCluster of ``--workers`` processes (resolved: >= 1), or (client, None) on
    ``--scheduler``."""
    import dask
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # dask logs each worker start/stop at INFO
    tornado = logging.getLogger("tornado.application")
    if not any(isinstance(f, _NoCancelNameError) for f in tornado.filters):
        tornado.addFilter(_NoCancelNameError())

    if cfg.scheduler:
        _check_listening(cfg.scheduler)
        try:
            return Client(cfg.scheduler, timeout=f"{SCHEDULER_TIMEOUT_S}s"), None
        except (OSError, TimeoutError, ValueError) as e:  # ValueError: an address dask cannot parse
            raise UsageError(f"cannot reach --scheduler {cfg.scheduler} ({e})") from e
    # dask's nanny starts workers with OMP/MKL/OpenBLAS pinned to one thread and an aggressive malloc trim
    # threshold: both slow torch down (a ViT-B-32 forward ran ~20% slower in such a worker). Give the cores
    # to torch instead.
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    environ = {k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    cluster = None
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), _ctrl_c_deferred():
            cluster = LocalCluster(
                n_workers=cfg.workers,
                threads_per_worker=1,
                processes=True,
                # no dashboard wanted, but dask's scheduler serves HTTP anyway, on 8787 for None: with that port
                # taken (another cluster, a notebook's) it printed a warning above every run's output
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
                **_with_our_preload(),
            )
        return Client(cluster), cluster  # a Ctrl-C during the start arrives by here
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise


SCHEDULER_TIMEOUT_S = 30  # dask's Client retries a scheduler that does not answer for this long
# A TCP address refused this long is taken for no scheduler (one that is starting listens sooner).
REFUSED_FOR_S = 10.0


def _check_listening(address: str) -> None:
    """A ``tcp://`` --scheduler (or a bare host:port) that refuses connections for REFUSED_FOR_S is refused, with
    a line as the wait starts: dask's Client retried it in silence for its whole timeout (30 s) before it said
    so. A scheduler still starting (a script that starts one, then this) gets that long to listen; other
    protocols, and addresses that do not answer at all, are left to dask. The probe is a bare TCP connection:
    the scheduler logs one INFO line for it ("closed before handshake completed")."""
    import socket

    rest = address[len("tcp://") :] if address.startswith("tcp://") else address
    host, sep, port = rest.rpartition(":")
    if "://" in rest or not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
        return  # another protocol, no port, or IPv6 without brackets (dask's own error says to add them)
    host = host.strip("[]")  # an IPv6 address's brackets
    deadline = time.monotonic() + REFUSED_FOR_S
    said = False
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=REFUSED_FOR_S):
                return
        except ConnectionRefusedError as e:
            if not said:
                log.info(
                    "--scheduler %s: nothing listens there yet; waiting up to %g s for a scheduler to start",
                    address, REFUSED_FOR_S,
                )  # fmt: skip
                said = True
            if time.monotonic() > deadline:
                raise UsageError(
                    f"cannot reach --scheduler {address}: nothing listens there ({e.strerror}); start a dask "
                    "scheduler at that address, or leave --scheduler out to start a local cluster"
                ) from e
            time.sleep(0.25)
        except OSError:  # no such host, or no answer: dask's own connect says so (after its timeout)
            return


def _with_our_preload() -> dict:
    """The workers' preloads: the user's own (dask's config takes a name or a list, and argv for all of them or
    one list each), then `dask_setup` below, run in each worker process as it starts (a restarted one too)."""
    import dask

    preload = dask.config.get("distributed.worker.preload", None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = dask.config.get("distributed.worker.preload-argv", None) or []
    if argv and not isinstance(argv[0], str):  # one list each: ours takes none
        return {"preload": [*preload, __name__], "preload_argv": [*argv, []]}
    return {"preload": [*preload, __name__]}


@contextlib.contextmanager
def _ctrl_c_deferred():
    """A Ctrl-C while the block starts the cluster is taken once the cluster is whole, and closed (`connect`):
    one that landed inside LocalCluster's start left a half-made cluster for dask's exit hook, which failed on
    it (`AssertionError: Status.init`). A second Ctrl-C is taken at once (a start that hangs). A worker process
    that a Ctrl-C finds still importing, before `dask_setup` runs, still dies with a traceback (and the start
    then fails: an interrupt all the same, its error logged). Where `signals.handling` installs nothing, nothing
    changes."""
    pressed = []
    before = signal.getsignal(signal.SIGINT)

    def on_sigint(*_):
        pressed.append(True)
        if len(pressed) > 1:
            signal.signal(signal.SIGINT, before)
            raise KeyboardInterrupt

    with handling(signal.SIGINT, on_sigint):
        try:
            yield
        except Exception as e:
            if pressed:  # e.g. "Nanny failed to start": the same Ctrl-C ended a worker as it started
                log.warning("the dask cluster's start, interrupted, failed: %s: %s", type(e).__name__, e)
                raise KeyboardInterrupt from e
            raise
    if pressed:
        raise KeyboardInterrupt


def dask_setup(worker) -> None:
    """A LocalCluster's worker process ignores Ctrl-C. The terminal sends SIGINT to the whole process group:
    each worker used to die of it with a traceback of its own (and the read-ahead plugin's teardown error) above
    the one line that says what to do, while this command, which gets it too, closes the cluster and so ends
    them anyway. Nor does it log its heartbeats that fail as that close takes the scheduler down first (a
    traceback each, when the Ctrl-C finds the worker busy warming its models): its scheduler lives in this
    command's process, so one gone is never news to the user."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(_NoFailedHeartbeats())
    logging.getLogger("distributed.worker").addFilter(_NoOwnErrors())
    logging.getLogger().addFilter(_NoOpenClipRandomNote())  # open_clip logs through the root logger


class _NoOpenClipRandomNote(logging.Filter):
    """open_clip's "No pretrained weights loaded" for random weights: `pipeline.encoders` says so in its words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


class _NoFailedHeartbeats(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")


class _NoOwnErrors(logging.Filter):
    """A task that raises one of our errors (a worker's model unlike the store's, a RecursionError made short):
    the command says it in its own line, and the worker's "Compute Failed" block with the task's traceback
    only buried it."""

    OWN = re.compile(r"Exception: [\"']?(UsageError|StageError)\(")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Compute Failed") and self.OWN.search(message))


class _NoCancelNameError(logging.Filter):
    """distributed's `sync` (2026.8) cancels its call when Ctrl-C reaches the waiting thread; one that came
    before the call had started fails in that cancel ("cannot access free variable 'future'"), and tornado logs
    the NameError with its traceback at ERROR, above the command's one line. Harmless: the call never started."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NameError) and "free variable 'future'" in str(exc))


def task_resources(cfg, device: str) -> dict | None:
    """What each shard task (and the latent calibration) asks of a worker: one ``GPU`` on a cluster with
    ``--device cuda``, nothing otherwise."""
    return {"GPU": 1} if cfg.scheduler and device == "cuda" else None


def cluster_device(client, device: str) -> str:
    """``--device`` for a run on an existing scheduler, settled by its workers.

    ``auto`` is ``cuda`` when every worker sees a CUDA device, else ``cpu``; it needs a worker to ask.
    ``cuda`` needs a worker that declares a ``GPU`` resource (the shard tasks ask for one; without one they
    would wait forever), and each of those must see a CUDA device. ``cuda:N`` needs every worker to see GPU N.
    A refusal is a UsageError naming a worker; nothing has been written yet."""
    from pipeline.encoders import check_device_name

    check_device_name(device)
    if device == "cpu":
        return device
    info = workers(client)
    if not info:
        if device == "auto":
            raise UsageError(
                "--device auto with --scheduler: no dask worker has joined yet to say whether it has a GPU; "
                "start the workers first, or pass --device cpu or cuda"
            )
        return device  # the tasks wait for workers; each one's GPU is checked as it warms up
    # A worker that leaves meanwhile, or fails to answer, is left out: it takes no task of this run.
    counts = client.run(_cuda_device_count, on_error="return")
    info = {w: i for w, i in info.items() if isinstance(counts.get(w), int)}
    if not info:
        raise UsageError(f"--device {device} with --scheduler: no dask worker answered how many GPUs it sees")
    if device == "auto":
        blind = [w for w in info if not counts.get(w)]
        if not blind:
            return _with_gpu_resource(info, counts, "auto")
        if len(blind) < len(info):
            log.warning(
                "--device auto: %d of %d dask workers see no CUDA device, so every worker embeds on CPU; "
                "pass --device cuda to embed on the workers that declare a GPU resource only",
                len(blind),
                len(info),
            )
        return "cpu"
    if device == "cuda":
        return _with_gpu_resource(info, counts, "cuda")
    n = int(device[5:])
    short = sorted(w for w in info if counts.get(w, 0) <= n)
    if short:
        raise UsageError(
            f"--device {device}: dask worker {short[0]} sees {counts.get(short[0], 0)} CUDA device(s)"
            f"{f' ({len(short)} such workers)' if len(short) > 1 else ''}; valid there: cpu"
            + (f", cuda, cuda:0..cuda:{counts.get(short[0]) - 1}" if counts.get(short[0]) else "")
        )
    return device


def _with_gpu_resource(info: dict, counts: dict, asked: str) -> str:
    able = able_workers(info, {"GPU": 1})
    if not able:
        raise UsageError(
            f"--device {asked} with --scheduler: each shard task asks for one GPU resource and none of the "
            f"{len(info)} dask worker(s) declares one; start them with `dask worker ... --resources GPU=1`, "
            "or pass --device cpu"
        )
    blind = [w for w in able if not counts.get(w)]
    if blind:
        raise UsageError(
            f"--device {asked}: dask worker {blind[0]} declares a GPU resource but sees no CUDA device"
            f"{f' ({len(blind)} such workers)' if len(blind) > 1 else ''}"
        )
    return "cuda"


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def warm_workers(client, params, resources: dict | None = None) -> dict[str, dict]:
    """Every worker that can take the shard tasks (has ``resources``) builds its models and warms its task
    thread now, in a task pinned to it (a task, not `client.run`, which would run in the worker's event-loop
    thread instead), and learns its GPU slot (`gpu_slots`). With one thread per worker no shard then pays these
    one-off costs; a worker's other threads, and a worker that joins later, warm up inside their first shard.
    A worker that leaves before its warm-up ran is skipped (its pinned task could never run). With no such worker
    yet (or none left), it waits for one to join: the first warm-up settles the store's CLIP probe, which every
    later worker then checks itself against. Returns each warmed worker's probe
    (`pipeline.embed_shard.warm_up`), by worker address."""
    from distributed import wait

    from pipeline.embed_shard import warm_up

    able = able_workers(workers(client), resources)
    if not able:  # no shard could run before one joins anyway, and its warm-up settles the store's CLIP probe
        log.warning(
            "no dask worker has the resources the shard tasks ask for (%s) yet: waiting for one to join",
            resources or "none",
        )
        while not able:
            time.sleep(WORKER_POLL_S)
            able = able_workers(workers(client), resources)
    visible = client.run(_cuda_visible_devices, workers=able) if params.device == "cuda" else {}
    slots = gpu_slots(able, visible)
    if params.device == "cuda":  # for workers that join later (`claim_late_slot`)
        table = {"slots": slots, "visible": visible, "own_list_hosts": own_list_hosts(able, visible)}
        client.set_metadata([SLOTS_KEY, params.out], table)
    futures = {
        w: client.submit(warm_up, params, slot, workers=[w], allow_other_workers=False, pure=False)
        for w, slot in slots.items()
    }
    pending = set(futures)
    while pending:
        try:
            wait([futures[w] for w in pending], timeout=10)
        except TimeoutError:
            pass
        live = workers(client)
        gone = {w for w in pending if futures[w].status == "pending" and w not in live}
        for w in gone:
            futures[w].cancel()
            log.warning("dask worker %s left before its warm-up; skipped", w)
        pending = {w for w in pending - gone if futures[w].status == "pending"}
    for f in futures.values():
        if f.status == "error":
            f.result()  # a model that cannot be built fails the run here, once, with its own error
    probes = {w: f.result() for w, f in futures.items() if f.status == "finished"}
    return probes or warm_workers(client, params, resources)  # every one left: the next to join, then


def able_workers(info: dict, resources: dict | None) -> list[str]:
    """The workers (of ``info``, the scheduler's) that declare ``resources``, in address order."""
    wanted = (resources or {}).items()
    return sorted(w for w, i in info.items() if all(i.get("resources", {}).get(k, 0) >= n for k, n in wanted))


def workers(client) -> dict:
    try:  # every worker: dask 2025.4-2026.3 list only 5 by default
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # older dask lists them all and has no such argument
        return client.scheduler_info()["workers"]


def _cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def gpu_slots(workers: list[str], visible: dict[str, str | None] | None = None) -> dict[str, int]:
    """Each worker's place among the workers on its host, in address order: with one worker per GPU on a host,
    worker k embeds on visible GPU k (`pipeline.embed_shard.worker_params`). Where the workers of a host were
    started with different ``CUDA_VISIBLE_DEVICES`` (``visible``), whoever started them gave each its GPU
    first in its list (dask-cuda rotates the list per worker), so each there gets slot 0."""
    own = own_list_hosts(workers, visible)
    slots = {}
    for host, ws in _by_host(workers).items():
        slots.update({w: 0 if host in own else i for i, w in enumerate(ws)})
    return slots


def own_list_hosts(workers: list[str], visible: dict[str, str | None] | None = None) -> list[str]:
    """The hosts whose workers were started with different ``CUDA_VISIBLE_DEVICES``."""
    visible = visible or {}
    return sorted(h for h, ws in _by_host(workers).items() if len({visible.get(w) for w in ws}) > 1)


def _by_host(workers: list[str]) -> dict[str, list[str]]:
    from distributed.comm import get_address_host

    by_host: dict[str, list[str]] = {}
    for w in sorted(workers):
        by_host.setdefault(get_address_host(w), []).append(w)
    return by_host


def claim_late_slot(run: str) -> int | None:
    """The GPU slot of a worker that got none at the start of ``run`` (it joined later, or dask restarted
    it), or None outside a dask worker or when the run published no slots. Under a lock on the scheduler it
    takes the lowest slot that no live worker on its host holds, so a restarted worker takes back the GPU
    its predecessor left, and publishes it. A worker with its own CUDA_VISIBLE_DEVICES (dask-cuda gives each
    worker the list rotated to start at its GPU) takes slot 0, the first GPU of its list, when its host's
    other workers have other lists or none is known."""
    from distributed import Lock, get_client, get_worker
    from distributed.comm import get_address_host

    try:
        me = get_worker().address
    except ValueError:
        return None
    client = get_client()
    mine, host = os.environ.get("CUDA_VISIBLE_DEVICES"), get_address_host(me)
    with Lock(f"{SLOTS_KEY}:{run}"):  # through the worker's own client
        table = client.get_metadata([SLOTS_KEY, run], default=None)
        if table is None:
            return None
        live = workers(client)
        mates = [
            w for w in table["slots"] if w != me and w in live and get_address_host(w) == host
        ]  # the live workers of this host that hold a slot
        visible = table.get("visible", {})
        own = host in table["own_list_hosts"] or (
            mine is not None and (not mates or any(visible.get(w) != mine for w in mates))
        )
        taken = {table["slots"][w] for w in mates}
        slot = 0 if own else next(k for k in range(len(taken) + 1) if k not in taken)
        client.set_metadata([SLOTS_KEY, run, "slots", me], slot)
        client.set_metadata([SLOTS_KEY, run, "visible", me], mine)
    log.warning("dask worker %s joined after the start: it takes GPU slot %d on its host", me, slot)
    return slot
