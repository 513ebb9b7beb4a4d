"""Shipped data and checksummed downloads, against a local HTTP server (no real network)."""
import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading

import pytest

from pyattn import datasets
from pyattn.studies import rotation

from conftest import DATA_DIR, requires_data


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_writes_a_verified_file(server, tmp_path):
    www, url = server
    (www / "a.bin").write_bytes(b"x" * 3_000_000)  # several read chunks
    target = tmp_path / "out" / "a.bin"
    datasets.download(url + "a.bin", str(target), sha256=sha256(b"x" * 3_000_000))
    assert target.read_bytes() == b"x" * 3_000_000
    assert os.listdir(target.parent) == ["a.bin"]


def test_a_corrupt_download_leaves_nothing_behind(server, tmp_path):
    www, url = server
    (www / "a.bin").write_bytes(b"corrupted")
    target = tmp_path / "out" / "a.bin"
    with pytest.raises(datasets.DownloadError, match="sha256 .* is not the expected"):
        datasets.download(url + "a.bin", str(target), sha256=sha256(b"original"))
    assert os.listdir(target.parent) == []
    # an existing file is not replaced by a corrupt download
    target.write_bytes(b"kept")
    with pytest.raises(datasets.DownloadError):
        datasets.download(url + "a.bin", str(target), md5="0" * 32)
    assert os.listdir(target.parent) == ["a.bin"] and target.read_bytes() == b"kept"


def test_a_missing_file_is_a_clear_error(server, tmp_path):
    _, url = server
    target = tmp_path / "out" / "none.bin"
    with pytest.raises(datasets.DownloadError, match="HTTP 404"):
        datasets.download(url + "none.bin", str(target), sha256="0" * 64)
    assert os.listdir(target.parent) == []
    with pytest.raises(ValueError, match="exactly one"):
        datasets.download(url + "none.bin", str(target))


def test_planetoid_sums_are_those_of_the_shipped_files():
    with open(os.path.join(DATA_DIR, "SHA256SUMS")) as f:
        shipped = dict(reversed(line.split()) for line in f if "planetoid/" in line)
    assert {os.path.basename(k): v for k, v in shipped.items()} == datasets.PLANETOID_SHA256


@requires_data("planetoid", "ind.cora.x")
def test_planetoid_download_from_a_mirror_then_loads(server, tmp_path, monkeypatch):
    www, url = server
    for file in datasets.planetoid_files("cora"):
        (www / file).write_bytes(open(os.path.join(DATA_DIR, "planetoid", file), "rb").read())
    root = tmp_path / "planetoid"
    datasets.download_planetoid(str(root), "cora", base_url=url)
    assert sorted(os.listdir(root)) == sorted(datasets.planetoid_files("cora"))
    data = datasets.load_planetoid(str(root), "cora")
    assert data.num_nodes == 2708 and data.num_classes == 7
    # a changed file on the mirror is refused, and the rest stay as they were
    os.remove(root / "ind.cora.graph")
    (www / "ind.cora.graph").write_bytes(b"not the graph")
    with pytest.raises(datasets.DownloadError, match="ind.cora.graph"):
        datasets.download_planetoid(str(root), "cora", base_url=url)
    assert not (root / "ind.cora.graph").exists() and len(os.listdir(root)) == 7


def test_cifar_download_through_the_checked_path(server, tmp_path, monkeypatch):
    www, url = server
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in rotation.CIFAR_TRAIN + [rotation.CIFAR_TEST]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    (www / "cifar.tar.gz").write_bytes(buffer.getvalue())
    monkeypatch.setattr(rotation, "CIFAR_URL", url + "cifar.tar.gz")
    monkeypatch.setattr(rotation, "CIFAR_MD5", hashlib.md5(buffer.getvalue()).hexdigest())
    rotation.download_cifar10(str(tmp_path / "cifar"))
    assert (tmp_path / "cifar" / "test_batch").read_bytes() == b"test_batch"
    monkeypatch.setattr(rotation, "CIFAR_MD5", "0" * 32)
    with pytest.raises(datasets.DownloadError, match="md5"):
        rotation.download_cifar10(str(tmp_path / "other"))
    assert os.listdir(tmp_path / "other") == []


def test_shipped_data_points_into_the_repository():
    assert datasets.shipped_data("text") == os.path.join(datasets.DATA_DIR, "text")
    assert os.path.samefile(datasets.DATA_DIR, DATA_DIR)
