"""The host's pip settings made fit for the Docker smoke test's container (``rcm_nddr.commands.pip_settings``):
the files and folders they name are mounted where they exist and left out, with a note, where they do not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rcm_nddr.commands.pip_settings import container_settings, parse_config_list

pytestmark = pytest.mark.unit

LISTED = """\
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.find-links='/opt/wheels'
global.timeout='60'
install.timeout='90'
freeze.all='true'
:env:.default-timeout='180'
:env:.find-links='/srv/wheels /opt/gone https://example.org/wheels'
"""


def test_config_list_is_read_with_pips_precedence():
    settings = parse_config_list(LISTED)
    assert settings == {
        "cert": "/etc/ssl/certs/ca-certificates.crt",
        "constraint": "/etc/xdg/pip/constraints.txt",
        "find-links": "/srv/wheels /opt/gone https://example.org/wheels",  # the variable overrides the file
        "timeout": "90",  # install over global
        "default-timeout": "180",
    }  # freeze.* does not apply to pip install


def test_host_paths_are_mounted_where_they_exist_and_left_out_where_not():
    existing = {"/etc/xdg/pip/constraints.txt", "/srv/wheels", "/srv/index/simple"}
    settings = parse_config_list(LISTED)
    settings["extra-index-url"] = "file:///srv/index/simple https://pypi.example/simple file:///nowhere/simple"
    out = container_settings(settings, exists=existing.__contains__)
    # the constraints file, the wheel folder, and a local index's root (its pages link the files beside it)
    assert out.mounts == ["/etc/xdg/pip/constraints.txt", "/srv/wheels", "/srv/index"]
    assert out.env == {
        "PIP_CONSTRAINT": "/etc/xdg/pip/constraints.txt",
        "PIP_FIND_LINKS": "/srv/wheels https://example.org/wheels",
        "PIP_TIMEOUT": "90",
        "PIP_DEFAULT_TIMEOUT": "180",
        "PIP_EXTRA_INDEX_URL": "file:///srv/index/simple https://pypi.example/simple",
    }
    notes = "\n".join(out.notes)
    assert "cert left out" in notes  # the host's CA bundle: the image has its own
    assert "/opt/gone left out (no such path" in notes and "file:///nowhere/simple left out" in notes


def test_a_setting_whose_every_path_is_missing_is_left_out():
    """What broke the smoke: a constraint naming a host file the container does not have."""
    out = container_settings({"constraint": "/etc/xdg/pip/constraints.txt"}, exists=lambda path: False)
    assert out.env == {} and out.mounts == []
    assert out.notes == ["pip setting constraint: /etc/xdg/pip/constraints.txt left out (no such path on this machine)"]


def test_a_relative_path_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    monkeypatch.chdir(tmp_path)
    out = container_settings({"find-links": "wheels"})
    assert out.env == {"PIP_FIND_LINKS": str(tmp_path / "wheels")} and out.mounts == [str(tmp_path / "wheels")]


def test_the_module_prints_lines_the_smoke_script_reads(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    env = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null", "PIP_CONSTRAINT": str(constraints)}
    env["PIP_FIND_LINKS"] = str(tmp_path / "missing")
    done = subprocess.run(
        [sys.executable, "-m", "rcm_nddr.commands.pip_settings"], env=env, capture_output=True, text=True, check=True
    )
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert ["MOUNT", str(constraints)] in lines and ["ENV", "PIP_CONSTRAINT", str(constraints)] in lines
    assert any(line[0] == "NOTE" and str(tmp_path / "missing") in line[1] for line in lines)
    assert not any(line[0] == "ENV" and line[1] == "PIP_FIND_LINKS" for line in lines)
