"""``rcm-nddr docker``: build the project's image and run ``train.py``/``test.py`` (or any command) in a
container, through the Docker SDK for Python (``pip install 'rcm-nddr[docker]'``).

``docker build`` sends the repository (filtered by ``.dockerignore``) to the engine and streams the
build output to the log; the host's git commit and dirty flag become the image's
``RCM_NDDR_GIT_COMMIT``/``RCM_NDDR_GIT_DIRTY`` (the image holds no ``.git``).

``docker run`` mounts the host's folders at the image's mount points (:data:`MOUNTS`), runs as the
host user's uid:gid so that results belong to that user, passes the image reference and id in
``RCM_NDDR_IMAGE``/``RCM_NDDR_IMAGE_ID`` (recorded by the run's provenance), streams the container's
output to stdout, stops the container on SIGTERM/SIGINT with a grace period (so that a preempted job
can write its checkpoint), removes it, and exits with its status.

The translation of arguments into SDK keyword arguments (:func:`build_kwargs`, :func:`run_kwargs`) is
kept in plain functions, separate from the calls to the engine."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any

from rcm_nddr import __version__
from rcm_nddr.errors import UserError
from rcm_nddr.source import git_output, source_tree

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container
    from docker.models.images import Image

log = logging.getLogger(__name__)

#: the image's working directory: configs, train.py and test.py are there, and relative config paths
#: (data/..., results/...) resolve against it
WORKDIR = "/rcm-nddr"
#: host folder role -> mount point in the container
MOUNTS = {
    "data": f"{WORKDIR}/data",  # datasets, mounted read-only
    "results": f"{WORKDIR}/results",  # model stores, runs, checkpoints, metrics
    "ri": f"{WORKDIR}/RI",  # RI decompositions
    "models": f"{WORKDIR}/models",  # TORCH_HOME: hub/checkpoints/<torchvision weights>, filter banks
}
DEFAULT_TAG = "rcm-nddr:latest"
#: /dev/shm of the container: DataLoader workers hand batches over through shared memory, and
#: Docker's default (64 MB) is too small for them
DEFAULT_SHM_SIZE = "8g"
#: seconds between SIGTERM and SIGKILL when the container is stopped
DEFAULT_STOP_TIMEOUT = 60
#: environment variables that tell the run's provenance which image it ran in
IMAGE_ENV = "RCM_NDDR_IMAGE"
IMAGE_ID_ENV = "RCM_NDDR_IMAGE_ID"
#: the image's registry digests (``name@sha256:...``, space-separated; empty for an image built here and
#: never pushed, whose id is already the sha256 digest of its configuration)
IMAGE_DIGESTS_ENV = "RCM_NDDR_IMAGE_DIGESTS"
#: lines of build output kept to explain a failing step
_ERROR_CONTEXT_LINES = 15
#: colour codes of the engine's build output (its stderr lines), and its own bookkeeping lines
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BOOKKEEPING = re.compile(r"^\s*(---> |Removing intermediate container )")


class DockerError(UserError):
    """``rcm-nddr docker`` cannot proceed: the SDK or the engine is missing, an argument or a host
    folder is wrong, or the build or the container failed to start; the message says which."""


def docker_sdk() -> ModuleType:
    """The ``docker`` package (the Docker SDK for Python), imported on first use."""
    try:
        import docker
    except ImportError as exc:
        raise DockerError(
            "rcm-nddr docker needs the Docker SDK for Python, which is not installed: "
            "pip install 'rcm-nddr[docker]' (or pip install 'docker>=7.0')"
        ) from exc
    return docker


def connect() -> DockerClient:
    """A client of the engine that ``DOCKER_HOST`` (default: the local socket) names, checked with a ping."""
    docker = docker_sdk()
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise DockerError(
            f"no Docker engine answers at {where} ({exc}); start one (e.g. `sudo systemctl start docker`) "
            "or point DOCKER_HOST at it"
        ) from exc
    return client


# ----------------------------------------------------------------------------- arguments -> SDK kwargs


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> dict (values kept as strings; a later key wins)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise DockerError(f"{flag} {item!r}: expected KEY=VALUE with KEY a variable name, e.g. {flag} SEED=1")
        out[key] = value
    return out


def git_build_args(root: Path) -> dict[str, str]:
    """``GIT_COMMIT`` (``git rev-parse HEAD``) and ``GIT_DIRTY`` (``true`` when ``git status --porcelain``
    lists anything, untracked files included, since they may be copied into the image) of the checkout
    at ``root``; ``unknown`` for both outside a git checkout or without git."""
    commit = git_output(root, "rev-parse", "HEAD")
    status = git_output(root, "--no-optional-locks", "status", "--porcelain")  # no index refresh, no lock
    if commit is None or status is None:
        log.warning("%s is not a git checkout (or git is missing): the image records commit 'unknown'", root)
        return {"GIT_COMMIT": "unknown", "GIT_DIRTY": "unknown"}
    return {"GIT_COMMIT": commit.strip(), "GIT_DIRTY": "true" if status.strip() else "false"}


def build_kwargs(
    context: Path,
    tag: str,
    *,
    base_image: str | None = None,
    network: str | None = None,
    build_args: Mapping[str, str] | None = None,
    git: Mapping[str, str] | None = None,
    pull: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of the low-level ``APIClient.build``. Build arguments, later ones winning:
    ``VERSION`` (this package's), the ``git`` ones (``GIT_COMMIT``, ``GIT_DIRTY``), ``BASE_IMAGE``
    when ``base_image`` is given, then ``build_args``."""
    args: dict[str, str] = {"VERSION": __version__, **(git or {})}
    if base_image:
        args["BASE_IMAGE"] = base_image
    args.update(build_args or {})
    kwargs: dict[str, Any] = {
        "path": str(context),
        "tag": tag,
        "buildargs": args,
        "rm": True,  # remove intermediate containers, also after a failed step
        "forcerm": True,
        "pull": pull,
        "decode": True,
    }
    if network:
        kwargs["network_mode"] = network
    return kwargs


def gpu_request(gpus: str) -> dict[str, Any] | None:
    """``--gpus`` -> keyword arguments of ``docker.types.DeviceRequest`` (None: no GPU). ``all``, a
    count ``N``, or ``device=ID[,ID...]``, as with ``docker run --gpus``; ``none`` or ``0``: no GPU."""
    text = gpus.strip().strip("\"'")
    if text in ("none", "0"):
        return None
    if text == "all":
        return {"count": -1, "capabilities": [["gpu"]]}
    if text.isdigit():
        return {"count": int(text), "capabilities": [["gpu"]]}
    if text.startswith("device="):
        ids = [i.strip() for i in text[len("device=") :].split(",") if i.strip()]
        if ids:
            return {"device_ids": ids, "capabilities": [["gpu"]]}
    raise DockerError(f"--gpus {gpus!r}: expected all, none, a count N, or device=ID[,ID...]")


def parse_ports(items: Sequence[str], network: str | None = None) -> dict[str, Any]:
    """``--port [IP:]HOST:CONTAINER`` values as the SDK's ``ports`` (``{"CONTAINER/tcp": HOST}``, or
    ``(IP, HOST)``); one clear error for a malformed value, a port out of range, or a network mode that
    publishes no ports (``none``, ``host``)."""
    ports: dict[str, Any] = {}
    for item in items:
        parts = item.rsplit(":", 2)
        numbers = parts[-2:]
        if len(parts) < 2 or not all(n.isdigit() and 0 < int(n) < 65536 for n in numbers):
            raise DockerError(f"--port {item}: expected [IP:]HOST:CONTAINER with ports 1-65535, e.g. 6006:6006")
        host, container = int(numbers[0]), int(numbers[1])
        ports[f"{container}/tcp"] = (parts[0], host) if len(parts) == 3 else host
    why = {
        "none": "a container without a network publishes no port",
        "host": "it uses the host's ports: leave --port out",
    }
    if ports and network in why:
        raise DockerError(f"--port with --network {network}: {why[network]}")
    return ports


def host_user() -> str:
    """``uid:gid`` of this process: what the container runs as by default."""
    return f"{os.getuid()}:{os.getgid()}"


def host_dirs(
    data: str | Path, results: str | Path, ri: str | Path | None = None, models: str | Path | None = None
) -> dict[str, Path]:
    """The host folders to mount, absolute: ``data`` must exist; ``results``, ``ri`` and ``models`` are
    created when missing (by this process, so they belong to the user who runs it)."""
    data_dir = Path(data).expanduser().resolve()
    if not data_dir.is_dir():
        raise DockerError(
            f"--data {data}: no such directory ({data_dir}); it is the host folder holding the datasets "
            f"(e.g. SYNTH_MT/), mounted read-only at {MOUNTS['data']}"
        )
    out = {"data": data_dir}
    for role, path in (("results", results), ("ri", ri), ("models", models)):
        if path is None:
            continue
        folder = Path(path).expanduser().resolve()
        if folder.exists() and not folder.is_dir():
            raise DockerError(f"--{role} {path}: {folder} exists and is not a directory")
        folder.mkdir(parents=True, exist_ok=True)
        out[role] = folder
    return out


def run_kwargs(
    image: str,
    image_id: str,
    command: Sequence[str],
    dirs: Mapping[str, Path],
    *,
    gpus: str = "none",
    shm_size: str | None = DEFAULT_SHM_SIZE,
    ipc_host: bool = False,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    name: str | None = None,
    network: str | None = None,
    ports: Mapping[str, Any] | None = None,
    repo_digests: Sequence[str] = (),
) -> dict[str, Any]:
    """Keyword arguments of ``client.containers.create`` for ``command`` in the image ``image_id``
    (tagged ``image``), with the folders of ``dirs`` (``host_dirs``) bind-mounted at :data:`MOUNTS`
    (data read-only), as ``user`` (default: the host user), with docker-init as PID 1 (it forwards
    signals to the command), and ``RCM_NDDR_IMAGE``/``RCM_NDDR_IMAGE_ID``/``RCM_NDDR_IMAGE_DIGESTS`` set.

    Shared memory: a private IPC namespace with a ``shm_size`` /dev/shm (a size limit, not a
    reservation), or the host's IPC namespace with ``ipc_host`` (what RCM's instructions used,
    ``--ipc=host``; less isolated)."""
    if not command:
        raise DockerError("no command to run: put it after --, e.g. -- python train.py --config configs/...")
    unknown = set(dirs) - set(MOUNTS)
    if unknown:
        raise DockerError(f"unknown host folder roles {sorted(unknown)}; expected {sorted(MOUNTS)}")
    docker = docker_sdk()
    mounts = [
        docker.types.Mount(MOUNTS[role], str(path), type="bind", read_only=role == "data")
        for role, path in dirs.items()
    ]
    kwargs: dict[str, Any] = {
        "image": image_id,  # the id, so that a tag moved meanwhile cannot change what runs
        "command": list(command),
        "user": user or host_user(),
        "mounts": mounts,
        "environment": {
            **(env or {}),
            IMAGE_ENV: image,
            IMAGE_ID_ENV: image_id,
            IMAGE_DIGESTS_ENV: " ".join(repo_digests),
        },
        "init": True,
        "labels": {"org.opencontainers.image.ref.name": image, "rcm-nddr.command": " ".join(command)},
    }
    if ipc_host:
        kwargs["ipc_mode"] = "host"
    elif shm_size:
        kwargs["shm_size"] = shm_size
    request = gpu_request(gpus)
    if request is not None:
        kwargs["device_requests"] = [docker.types.DeviceRequest(**request)]
    if name:
        kwargs["name"] = name
    if network:
        kwargs["network_mode"] = network
    if ports:
        kwargs["ports"] = dict(ports)
    return kwargs


# ----------------------------------------------------------------------------- engine calls


def build_image(client: DockerClient, kwargs: Mapping[str, Any]) -> str:
    """Build with ``client.api.build(**kwargs)`` (``build_kwargs``), logging the output as it comes,
    and return the image id; a failing step raises one ``DockerError`` with the step, the engine's
    message and the step's last output lines."""
    docker = docker_sdk()
    step = ""
    recent: deque[str] = deque(maxlen=_ERROR_CONTEXT_LINES)  # the running step's output
    image_id: str | None = None
    try:
        for chunk in client.api.build(**kwargs):
            if "error" in chunk:
                message = (chunk.get("errorDetail") or {}).get("message") or chunk["error"]
                output = "".join(f"\n  | {line}" for line in recent)
                where = f"step '{step}'" if step else "the start"
                raise DockerError(
                    f"docker build of {kwargs['path']} failed at {where}: {message.strip()}"
                    + (f"\nlast output of the step:{output}" if output else "")
                )
            for line in _ANSI.sub("", chunk.get("stream") or "").splitlines():
                if not line.strip():
                    continue
                log.info("%s", line.rstrip())
                if line.startswith("Step "):
                    step = line.strip()
                    recent.clear()
                elif not _BOOKKEEPING.match(line):
                    recent.append(line.rstrip())
            if chunk.get("status"):  # pulling the base image
                log.debug("%s %s", chunk["status"], chunk.get("progress", ""))
            aux = chunk.get("aux")
            if isinstance(aux, dict) and aux.get("ID"):
                image_id = aux["ID"]
        if kwargs.get("tag"):
            image_id = client.images.get(kwargs["tag"]).id
    except docker.errors.DockerException as exc:
        raise DockerError(f"docker build of {kwargs['path']} failed: {exc}") from exc
    if not image_id:
        raise DockerError(f"docker build of {kwargs['path']} reported no image id")
    return image_id


def image_of(client: DockerClient, image: str) -> Image:
    """The local image ``image`` (its ``id``, ``sha256:...``, and ``attrs``: its registry digests...)."""
    docker = docker_sdk()
    try:
        return client.images.get(image)
    except docker.errors.ImageNotFound as exc:
        raise DockerError(
            f"--image {image}: no such image in the engine; build it with `rcm-nddr docker build --tag {image}`"
        ) from exc
    except docker.errors.DockerException as exc:
        raise DockerError(f"--image {image}: {exc}") from exc


@contextmanager
def forward_signals(container: Container, stop_timeout: int) -> Iterator[threading.Event]:
    """While active, SIGTERM and SIGINT stop ``container`` (SIGTERM to its PID 1, docker-init, which
    passes it on; SIGKILL after ``stop_timeout`` seconds) instead of ending this process; a second
    signal kills it at once. Yields an event set once a stop was requested."""
    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield stopping
        return

    def call(action: str, *args: Any, **kwargs: Any) -> None:
        try:
            getattr(container, action)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the container may be gone already; nothing to do then
            log.debug("container %s: %s failed: %s", container.short_id, action, exc)

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("%s again: killing container %s", name, container.short_id)
            threading.Thread(target=call, args=("kill",), daemon=True).start()
            return
        stopping.set()
        log.warning(
            "%s: stopping container %s (SIGTERM, SIGKILL after %d s; again to kill it now)",
            name,
            container.short_id,
            stop_timeout,
        )
        threading.Thread(target=call, args=("stop",), kwargs={"timeout": stop_timeout}, daemon=True).start()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopping
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_container(
    client: DockerClient,
    kwargs: Mapping[str, Any],
    *,
    stop_timeout: int = DEFAULT_STOP_TIMEOUT,
    out: IO[bytes] | None = None,
) -> int:
    """Create the container (``run_kwargs``), start it, copy its output (stdout and stderr) to ``out``
    (default: this process's stdout) until it exits, remove it, and return its exit status."""
    docker = docker_sdk()
    out = out or sys.stdout.buffer
    try:
        container = client.containers.create(**kwargs)
    except docker.errors.DockerException as exc:
        raise DockerError(f"cannot create a container of {kwargs.get('image')}: {_explain(exc)}") from exc
    image = (kwargs.get("environment") or {}).get(IMAGE_ENV) or kwargs.get("image")
    log.info("container %s of %s: %s", container.short_id, image, " ".join(kwargs["command"]))
    try:
        with forward_signals(container, stop_timeout) as stopping:
            try:
                container.start()
            except docker.errors.DockerException as exc:
                raise DockerError(f"cannot start container {container.short_id}: {_explain(exc)}") from exc
            for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
                out.write(chunk)
                out.flush()
            status = container.wait()
    finally:
        try:
            container.remove(v=True, force=True)
        except docker.errors.DockerException as exc:
            log.warning("could not remove container %s: %s", container.short_id, exc)
    code = int(status.get("StatusCode", 1))
    if status.get("Error"):
        log.warning("container %s: %s", container.short_id, status["Error"])
    if stopping.is_set():
        log.warning("container %s stopped on request, exit status %d", container.short_id, code)
    return code


def _explain(exc: BaseException) -> str:
    text = str(getattr(exc, "explanation", None) or exc)
    if "could not select device driver" in text:
        text += " (GPUs need the NVIDIA Container Toolkit on the host; or run with --gpus none)"
    return text


# ----------------------------------------------------------------------------- the command


def default_context() -> Path:
    """The repository this package runs from (it holds the Dockerfile)."""
    return source_tree()


def build(args: argparse.Namespace) -> int:
    context = Path(args.context).expanduser().resolve() if args.context else default_context()
    if not (context / "Dockerfile").is_file():
        raise DockerError(
            f"--context {context}: no Dockerfile there; pass --context with the root of an rcm-nddr checkout"
        )
    kwargs = build_kwargs(
        context,
        args.tag,
        base_image=args.base_image,
        network=args.network,
        build_args=parse_key_values(args.build_arg, "--build-arg"),
        git=git_build_args(context),
        pull=args.pull,
    )
    shown = " ".join(f"{k}={v}" for k, v in kwargs["buildargs"].items())
    log.info("building %s from %s (%s)", args.tag, context, shown)
    image_id = build_image(connect(), kwargs)
    log.info("built %s: %s", args.tag, image_id)
    return 0


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise DockerError("no command to run: put it after --, e.g. -- python train.py --config configs/...")
    env = parse_key_values(args.env, "--env")
    ports = parse_ports(args.port, args.network)
    dirs = host_dirs(args.data, args.results, args.ri, args.models)
    client = connect()
    found = image_of(client, args.image)
    image_id, repo_digests = found.id, found.attrs.get("RepoDigests") or []
    kwargs = run_kwargs(
        args.image,
        image_id,
        command,
        dirs,
        gpus=args.gpus,
        shm_size=args.shm_size,
        ipc_host=args.ipc_host,
        env=env,
        user=args.user,
        name=args.name,
        network=args.network,
        ports=ports,
        repo_digests=repo_digests,
    )
    for container, host in ports.items():
        log.info(
            "port %s of the container -> %s on the host",
            container,
            ":".join(map(str, host)) if isinstance(host, tuple) else host,
        )
    for role, path in dirs.items():
        log.info("mount %s -> %s%s", path, MOUNTS[role], " (read-only)" if role == "data" else "")
    return run_container(client, kwargs, stop_timeout=args.stop_timeout)
