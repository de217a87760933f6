"""Scale a batch out with Ray (``xmgie batch --ray [ADDRESS]``), an optional extra:
``pip install "xmgie[scale]"``.

* ``--ray`` starts a local Ray instance; ``--ray ADDRESS`` (e.g. ``ray://head:10001`` or
  ``head:6379``) joins a running cluster.
* One worker (a Ray actor) per GPU of the cluster, each holding one GPU; with
  ``--workers N`` exactly N workers, which on a machine without GPUs are CPU workers
  (``--cpus-per-worker`` threads each).
* Each worker is a :class:`~.batch.Session`: it loads the models once and keeps them
  across items (and variants). Its node registry comes from a factory the host passes
  (a module-level function, which Ray pickles by name), called in the worker's process.
* The driver keeps a queue of the items that are not done and hands each to the next
  idle worker, so every item runs exactly once and a slow worker never holds a shard
  back. Workers write their items into the run folder themselves (write then rename,
  as a single process does), so the run folder must be on storage every node sees
  (NFS, a shared disk; on one machine any folder); the layout is the same as a
  single-process run.
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from ..mgie_core.errors import XMGIEError
from .batch import BatchSettings, Session, read_record
from .dataset import Item
from .mapping import BatchError

LOCAL = "local"


class ScaleError(XMGIEError, RuntimeError):
    """Ray is missing, or the cluster cannot run the batch."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ScaleError("--ray needs Ray, which is not installed. Install the scale extra: "
                         "pip install \"xmgie[scale]\" (or pip install \"ray>=2.9\"), or run "
                         "without --ray.") from exc
    return ray


def configure_process(config: dict) -> None:
    """Model folders, tiny mode, device and threads of a worker process."""
    import torch

    from ..mgie_core import paths

    if config.get("device"):
        os.environ["XMGIE_DEVICE"] = config["device"]
    paths.configure(reset=True)
    if config.get("models_dirs"):
        paths.configure(models_dir=config["models_dirs"])
    if config.get("tiny_root"):
        paths.configure(tiny_root=config["tiny_root"])
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))


class BatchWorker:
    """The body of a Ray actor: one Session (models loaded once) per worker."""

    def __init__(self, config: dict, registry_factory: Callable[[], dict]):
        configure_process(config)
        self.session = Session(registry_factory())

    def info(self) -> dict:
        from ..mgie_core import host

        return {"host": socket.gethostname(), "pid": os.getpid(),
                "device": str(host.device())}

    def run(self, settings: dict, run_dir: str, item: dict) -> dict:
        return self.session.run_item(BatchSettings.from_json(settings), Path(run_dir),
                                     Item.from_json(item))


def _local_pythonpath() -> str | None:
    """The folder holding this ``xmgie`` package, so local workers import the same code
    as the driver even when it is not installed (e.g. run from a checkout)."""
    package = Path(__file__).resolve().parent.parent
    if package.name != "xmgie":
        return None
    parts = [str(package.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                     if p]
    return os.pathsep.join(dict.fromkeys(parts))


class RayExecutor:
    """Runs a batch's items on Ray workers (see the module docstring)."""

    def __init__(self, address: str | None = LOCAL, workers: int | None = None,
                 cpus_per_worker: int = 1, process_config: dict | None = None, *,
                 registry_factory: Callable[[], dict]):
        self.ray = ray = import_ray()
        if workers is not None and workers < 1:
            raise BatchError(f"--workers {workers}: expected 1 or more")
        cpus_per_worker = max(1, int(cpus_per_worker))
        env = {"XMGIE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": str(cpus_per_worker), "MKL_NUM_THREADS": str(cpus_per_worker),
               "TOKENIZERS_PARALLELISM": "false"}
        local = address in (None, LOCAL)
        if local and _local_pythonpath():
            env["PYTHONPATH"] = _local_pythonpath()
        kwargs = dict(include_dashboard=False, log_to_driver=False,
                      runtime_env={"env_vars": env}, configure_logging=False)
        self._started = not ray.is_initialized()
        if self._started:
            if local:
                need = (workers or 1) * cpus_per_worker
                ray.init(num_cpus=max(os.cpu_count() or 1, need), **kwargs)
            else:
                ray.init(address=address, **kwargs)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if workers is None:
            if gpus == 0:
                self.close()
                raise ScaleError("the Ray cluster has no GPU; pass --workers N to run N "
                                 "CPU workers, or point --ray at a cluster with GPUs")
            workers, per_gpu = gpus, 1
        else:
            per_gpu = 1 if gpus >= workers else 0
        config = dict(process_config or {}, threads=cpus_per_worker)
        actor = ray.remote(BatchWorker)
        self.workers = [actor.options(num_cpus=cpus_per_worker, num_gpus=per_gpu,
                                      max_restarts=0).remote(config, registry_factory)
                        for _ in range(workers)]
        self.kind = "GPU" if per_gpu else "CPU"

    def describe(self) -> str:
        return f"{len(self.workers)} Ray {self.kind} worker(s)"

    def run(self, settings: BatchSettings, run_dir: Path, items: Sequence[Item],
            collect: Callable[[dict], None]) -> None:
        """Hand every item to an idle worker, exactly once; ``collect`` each record."""
        ray = self.ray
        settings_ref = ray.put(settings.to_json())
        queue = collections.deque(items)
        idle = list(self.workers)
        pending: dict = {}
        checked = False
        try:
            while queue or pending:
                while queue and idle:
                    worker, item = idle.pop(0), queue.popleft()
                    ref = worker.run.remote(settings_ref, str(Path(run_dir).resolve()),
                                            item.to_json())
                    pending[ref] = (worker, item)
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    worker, item = pending.pop(ref)
                    try:
                        record = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        collect(_lost_item(settings, run_dir, item, exc))
                        if not idle and not pending and queue:
                            raise ScaleError("every Ray worker died; the last error: "
                                             f"{exc}") from exc
                        continue
                    idle.append(worker)
                    if not checked:
                        checked = True
                        if read_record(run_dir, item.id) is None:
                            raise ScaleError(
                                f"a Ray worker ran item '{item.id}' but its record is not in "
                                f"{run_dir} as this machine sees it: put --out on storage "
                                "every Ray node mounts at the same path (see README, "
                                "'Scale out with Ray')")
                    collect(record)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        ray = self.ray
        for w in getattr(self, "workers", []):
            try:
                ray.kill(w)
            except Exception:
                pass
        self.workers = []
        if self._started and ray.is_initialized():
            ray.shutdown()


def _lost_item(settings: BatchSettings, run_dir: Path, item: Item, exc: BaseException) -> dict:
    """The record of an item whose worker died (written by the driver)."""
    from .batch import ITEMS_DIR, RECORD_FILE, write_json_atomic

    record = {"id": item.id, "status": "failed", "inputs": item.fields, "outputs": [],
              "settings": {"fingerprint": settings.fingerprint()},
              "error": {"type": type(exc).__name__,
                        "message": f"the Ray worker running it died: {exc}"}}
    folder = Path(run_dir) / ITEMS_DIR / item.id
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RECORD_FILE, record)
    return record
