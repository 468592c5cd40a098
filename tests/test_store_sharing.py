"""`rcm-nddr store dedupe` / `link_identical`: identical bank, decomposition and calibration files of
several stores become one file, hard-linked, without changing what any store reads."""

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rcm_nddr.commands import cli
from rcm_nddr.files import atomic_write, file_sha256
from rcm_nddr.store import ModelStore, sharing
from rcm_nddr.store.format import BANK_FILE, CALIBRATION_FILE, DECOMPOSITION_FILE
from rcm_nddr.store.sharing import link_identical
from tests.test_store import bank, register

SHARED = (BANK_FILE, DECOMPOSITION_FILE, CALIBRATION_FILE)


@pytest.fixture
def stores(tmp_path) -> list[ModelStore]:
    """Three stores: a and b made from one bank, decomposition and calibration set; c from another bank
    with the same decomposition and calibration set."""
    decomposition = tmp_path / "decomposition.safetensors"
    save_file({"conv1.U": torch.eye(4)}, str(decomposition))
    other = {k: v + 1 for k, v in bank().items()}
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    made = []
    for name, filters in (("a", bank()), ("b", bank()), ("c", other)):
        store = ModelStore.create(tmp_path / name, "resnet18", "tiny bank", filters, decomposition_file=decomposition)
        register(store, "semseg")
        store.add_calibration(images, "train crops")
        made.append(store)
    return made


def contents(stores: list[ModelStore]) -> dict[Path, str]:
    return {p: file_sha256(p) for s in stores for p in sorted(s.path.rglob("*")) if p.is_file()}


def test_identical_files_become_one_and_no_store_changes(stores):
    a, b, c = stores
    before = contents(stores)
    report = link_identical([s.path for s in stores])

    assert contents(stores) == before  # every file of every store reads the same bytes
    inode = {(s.path.name, n): (s.path / n).stat().st_ino for s in stores for n in SHARED}
    for name in SHARED:
        assert inode[("a", name)] == inode[("b", name)]
        assert (a.path / name).stat().st_nlink == (3 if name != BANK_FILE else 2)
    assert inode[("c", BANK_FILE)] != inode[("a", BANK_FILE)]  # another bank: its own file
    assert inode[("c", DECOMPOSITION_FILE)] == inode[("a", DECOMPOSITION_FILE)]
    assert inode[("c", CALIBRATION_FILE)] == inode[("a", CALIBRATION_FILE)]
    assert sorted((p.parent.name, p.name) for p, _ in report.linked) == [
        ("b", CALIBRATION_FILE),
        ("b", BANK_FILE),
        ("b", DECOMPOSITION_FILE),
        ("c", CALIBRATION_FILE),
        ("c", DECOMPOSITION_FILE),
    ]  # fmt: skip (sorted by name: calibration, filter_bank, ri)
    assert all(source.parent == a.path for _, source in report.linked)
    freed = sum((b.path / n).stat().st_size for n in SHARED) + sum(
        (c.path / n).stat().st_size for n in (DECOMPOSITION_FILE, CALIBRATION_FILE)
    )
    assert report.freed_bytes == freed and report.skipped == []
    for store in stores:
        assert ModelStore(store.path).verify(probes=False) == []
    assert not list(b.path.glob(".*.tmp"))  # no temporary left behind

    again = link_identical([s.path for s in stores])  # already shared: nothing to do
    assert again.linked == [] and again.freed_bytes == 0


def test_a_file_outside_the_stores_can_be_the_copy_they_share(stores, tmp_path):
    """The decomposition beside a bank, which the stores copied: their copies become links to it, and it
    is never replaced itself (a source that does not exist is no error)."""
    source = tmp_path / "decomposition.safetensors"
    inode = source.stat().st_ino
    before = contents(stores)
    report = link_identical([s.path for s in stores], sources=[tmp_path / "missing.safetensors", source])
    assert source.stat().st_ino == inode and source.stat().st_nlink == 4
    assert all((s.path / DECOMPOSITION_FILE).stat().st_ino == inode for s in stores)
    assert sorted(p.parent.name for p, src in report.linked if src == source) == ["a", "b", "c"]
    assert contents(stores) == before


def test_a_store_rewriting_a_shared_file_keeps_the_others(stores):
    a, b, _ = stores
    link_identical([a.path, b.path])
    target = a.path / CALIBRATION_FILE
    kept = file_sha256(b.path / CALIBRATION_FILE)
    atomic_write(target, lambda tmp: tmp.write_bytes(b"another content"))  # how the store writes any file
    assert file_sha256(b.path / CALIBRATION_FILE) == kept
    assert target.stat().st_ino != (b.path / CALIBRATION_FILE).stat().st_ino


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EROFS])  # another filesystem, a read-only store
def test_a_file_that_cannot_be_linked_is_left_as_it_was(stores, monkeypatch, code):
    a, b, _ = stores
    before = contents([a, b])

    def refuse(source, target):
        raise OSError(code, os.strerror(code), str(source), str(target))

    monkeypatch.setattr(sharing.os, "link", refuse)
    report = link_identical([a.path, b.path])
    assert report.linked == [] and report.freed_bytes == 0
    assert len(report.skipped) == 3 and all(os.strerror(code) in line for line in report.skipped)
    assert contents([a, b]) == before
    assert (b.path / BANK_FILE).stat().st_nlink == 1


def test_a_file_replaced_while_hashing_is_not_linked(stores, monkeypatch):
    a, b, _ = stores
    hashed = []
    real = sharing.file_sha256

    def hash_then_replace(path):
        digest = real(path)
        hashed.append(path)
        if path == b.path / BANK_FILE:  # a writer replaces a's bank (same bytes, new file) meanwhile
            data = (a.path / BANK_FILE).read_bytes()
            atomic_write(a.path / BANK_FILE, lambda tmp: tmp.write_bytes(data))
        return digest

    monkeypatch.setattr(sharing, "file_sha256", hash_then_replace)
    report = link_identical([a.path, b.path])
    assert f"{b.path / BANK_FILE}: not linked to {a.path / BANK_FILE} (that file changed" in report.skipped[0]
    assert sorted(p.name for p, _ in report.linked) == [CALIBRATION_FILE, DECOMPOSITION_FILE]  # the others still are
    assert (b.path / BANK_FILE).stat().st_nlink == 1
    assert ModelStore(a.path).verify(probes=False) == [] == ModelStore(b.path).verify(probes=False)


def test_store_dedupe_command(stores, tmp_path, capsys):
    a, b, _ = stores
    assert cli.main(["store", "dedupe", str(a.path), str(b.path)]) == 0
    out = capsys.readouterr().out
    assert f"{b.path / BANK_FILE} -> {a.path / BANK_FILE}" in out
    assert "3 file(s) linked" in out
    (tmp_path / "empty").mkdir()
    assert cli.main(["store", "dedupe", str(a.path), str(tmp_path / "empty")]) != 0
    assert f"{tmp_path / 'empty'} is not a model store" in capsys.readouterr().err
