"""Graph data sets: Planetoid (Cora, CiteSeer) from the standard raw files, and
Zachary's karate club built in, so examples run with no files at all."""
from __future__ import annotations

import dataclasses
import io
import os
import pickle

import numpy as np
import torch

PLANETOID = ("cora", "citeseer")
# numpy's array-unpickling helper: numpy._core in numpy 2 (numpy.core warns there).
NUMPY_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
PLANETOID_PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph")


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
                                "public Planetoid release, e.g. github.com/kimiyoung/planetoid "
                                "data/, into --data-dir)")
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
