"""Data sets: where the shipped ones are, checksummed downloads, and the graph
data sets -- Planetoid (Cora, CiteSeer) from the standard raw files, and
Zachary's karate club built in, so examples run with no files at all."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tempfile
import urllib.error
import urllib.request

from typing import Optional

import numpy as np
import torch

# The data shipped in the repository (data/README.md); PYATTN_DATA_DIR overrides.
DATA_DIR = os.environ.get(
    "PYATTN_DATA_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "data"))


def shipped_data(*parts: str) -> str:
    """Path of a file or folder under DATA_DIR (the repository's data/ folder)."""
    return os.path.join(DATA_DIR, *parts)


class DownloadError(OSError):
    """A download failed (HTTP error, unreachable host) or its checksum did not match."""


def download(url: str, path: str, sha256: Optional[str] = None, md5: Optional[str] = None,
             timeout: float = 60.0) -> str:
    """Fetch ``url`` into ``path``, checking its sha256 (or md5) before it appears.

    The bytes go to a temporary file beside ``path``, are hashed as they
    arrive, and only a file whose checksum matches is renamed (atomically) to
    ``path``; on any failure the temporary file is removed and ``path`` is
    left as it was. Returns ``path``.
    """
    if (sha256 is None) == (md5 is None):
        raise ValueError("download: give exactly one of sha256, md5")
    algorithm, expected = ("sha256", sha256) if sha256 else ("md5", md5)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".",
                                   suffix=".part")
    try:
        digest = hashlib.new(algorithm)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as error:
                raise DownloadError(f"download of {url} failed: HTTP {error.code} "
                                    f"{error.reason}") from error
            except (urllib.error.URLError, OSError) as error:
                raise DownloadError(f"download of {url} failed: {error}") from error
        if digest.hexdigest() != expected:
            raise DownloadError(f"download of {url}: {algorithm} {digest.hexdigest()} is not the "
                                f"expected {expected} (corrupt or changed file; {path} was not "
                                "written)")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


PLANETOID = ("cora", "citeseer")
# numpy's array-unpickling helper: numpy._core in numpy 2 (numpy.core warns there).
NUMPY_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
PLANETOID_PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph")
# The raw files of the public Planetoid release (github.com/kimiyoung/planetoid, data/),
# with the sha256 of each (as data/SHA256SUMS lists them for the shipped copies).
PLANETOID_URL = "https://raw.githubusercontent.com/kimiyoung/planetoid/master/data/"
PLANETOID_SHA256 = {
    "ind.citeseer.allx": "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
    "ind.citeseer.ally": "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
    "ind.citeseer.graph": "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
    "ind.citeseer.test.index": "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
    "ind.citeseer.tx": "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
    "ind.citeseer.ty": "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
    "ind.citeseer.x": "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
    "ind.citeseer.y": "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
    "ind.cora.allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "ind.cora.ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "ind.cora.graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
    "ind.cora.test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
    "ind.cora.tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "ind.cora.ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "ind.cora.x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "ind.cora.y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
}


def planetoid_files(name: str) -> list[str]:
    """The eight file names of one Planetoid data set."""
    return [f"ind.{name}.{part}" for part in PLANETOID_PARTS + ("test.index",)]


def download_planetoid(root: str, name: str, base_url: str = PLANETOID_URL) -> None:
    """Fetch the missing raw files of Cora or CiteSeer into ``root``, each
    sha256-checked (:func:`download`) against :data:`PLANETOID_SHA256`."""
    name = name.lower()
    if name not in PLANETOID:
        raise ValueError(f"unknown Planetoid data set {name!r}; choose from {PLANETOID}")
    for file in planetoid_files(name):
        path = os.path.join(root, file)
        if not os.path.isfile(path):
            download(base_url + file, path, sha256=PLANETOID_SHA256[file])


@dataclasses.dataclass
class GraphData:
    name: str
    x: torch.Tensor            # (N, F) float32 node features
    y: torch.Tensor            # (N,) int64 labels
    edge_index: torch.Tensor   # (2, E) directed edges, both directions present
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    test_mask: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1


class _PlanetoidUnpickler(pickle.Unpickler):
    """Unpickles only what the Planetoid files hold (numpy arrays, a scipy CSR
    matrix, a defaultdict of lists); any other class is refused, since a pickle
    can run arbitrary code."""

    def find_class(self, module, name):
        import collections

        import scipy.sparse

        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): NUMPY_RECONSTRUCT,
            ("scipy.sparse.csr", "csr_matrix"): scipy.sparse.csr_matrix,
            ("scipy.sparse._csr", "csr_matrix"): scipy.sparse.csr_matrix,
            ("collections", "defaultdict"): collections.defaultdict,
            ("__builtin__", "list"): list,
            ("builtins", "list"): list,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not a class "
                                         "the Planetoid files contain")
        return allowed[(module, name)]


def safe_unpickle(data: bytes):
    """Load Planetoid pickle bytes (Python 2, latin1) with the restricted unpickler."""
    return _PlanetoidUnpickler(io.BytesIO(data), encoding="latin1").load()


def load_planetoid(root: str, name: str) -> GraphData:
    """Cora or CiteSeer from ``root/ind.<name>.{x,y,tx,ty,allx,ally,graph,test.index}``.

    The standard split: the first 140 (Cora; 120 CiteSeer) labelled nodes for
    training, the next 500 for validation, the 1000 test nodes of ``test.index``.
    CiteSeer's test nodes missing from ``tx`` (isolated) get zero features.
    """
    name = name.lower()
    if name not in PLANETOID:
        raise ValueError(f"unknown Planetoid data set {name!r}; choose from {PLANETOID}")
    paths = {part: os.path.join(root, f"ind.{name}.{part}") for part in PLANETOID_PARTS}
    paths["test.index"] = os.path.join(root, f"ind.{name}.test.index")
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Planetoid {name}: missing {', '.join(missing)} (download the "
                                "public Planetoid release into the folder with "
                                "pyattn.datasets.download_planetoid, or use the copy shipped "
                                "in data/planetoid)")
    parts = {}
    for part in PLANETOID_PARTS:
        with open(paths[part], "rb") as f:
            parts[part] = safe_unpickle(f.read())
    with open(paths["test.index"]) as f:
        test_index = np.array([int(line) for line in f if line.strip()])
    x, tx, allx = (np.asarray(parts[k].todense(), dtype=np.float32) for k in ("x", "tx", "allx"))
    y, ty, ally = (np.asarray(parts[k]) for k in ("y", "ty", "ally"))
    test_sorted = np.sort(test_index)
    if name == "citeseer":  # isolated test nodes absent from tx / ty: zero rows
        full = np.arange(test_sorted.min(), test_sorted.max() + 1)
        tx_ext = np.zeros((len(full), tx.shape[1]), dtype=np.float32)
        tx_ext[test_sorted - test_sorted.min()] = tx
        ty_ext = np.zeros((len(full), ty.shape[1]), dtype=ty.dtype)
        ty_ext[test_sorted - test_sorted.min()] = ty
        tx, ty = tx_ext, ty_ext
    features = np.vstack([allx, tx])
    labels = np.vstack([ally, ty])
    # tx rows follow the sorted test indices; put them where test.index says
    features[test_index] = features[test_sorted]
    labels[test_index] = labels[test_sorted]
    num_nodes = features.shape[0]
    edges = [(u, v) for u, nbrs in parts["graph"].items() for v in nbrs if u != v]
    edge_index = torch.tensor(edges, dtype=torch.long).t()
    edge_index = torch.unique(torch.cat([edge_index, edge_index.flip(0)], dim=1), dim=1)
    def mask(index):
        m = torch.zeros(num_nodes, dtype=torch.bool)
        m[torch.as_tensor(index)] = True
        return m
    return GraphData(name, torch.from_numpy(features), torch.from_numpy(labels.argmax(1)),
                     edge_index, mask(range(len(y))), mask(range(len(y), len(y) + 500)),
                     mask(test_index))


def karate_club() -> GraphData:
    """Zachary's karate club (34 members, 78 friendships; label: the club each
    joined after the split). One-hot features; 4 training nodes per club, 8
    validation and 18 test nodes (a fixed permutation)."""
    import networkx as nx

    graph = nx.karate_club_graph()
    edges = torch.tensor(list(graph.edges()), dtype=torch.long).t()
    edge_index = torch.cat([edges, edges.flip(0)], dim=1)
    y = torch.tensor([0 if graph.nodes[v]["club"] == "Mr. Hi" else 1 for v in graph.nodes])
    order = torch.randperm(34, generator=torch.Generator().manual_seed(0))
    train = torch.cat([order[y[order] == c][:4] for c in (0, 1)])
    rest = order[~torch.isin(order, train)]
    masks = [torch.zeros(34, dtype=torch.bool) for _ in range(3)]
    for m, index in zip(masks, (train, rest[:8], rest[8:])):
        m[index] = True
    return GraphData("karate", torch.eye(34), y, edge_index, *masks)
