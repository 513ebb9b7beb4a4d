"""Graphs for sparse graph convolutions, and the seed's matrix facts (Q3.1).

:class:`Graph` holds a graph as CSR rows of *targets*: row ``v`` lists the
sources ``u`` of the edges ``u -> v`` (``edge_index`` in COO, row 0 sources and
row 1 targets, as PyTorch Geometric), so ``spmm`` over it aggregates what
flows into each node. The CSR of the transpose, the degrees and the GCN
normalisation are built once and cached.
"""
from __future__ import annotations

from typing import Optional

import torch

from pyattn.ops.spmm import accumulation_dtype, csr_transpose, spmm


def adjacency_matrix(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Dense A with A[u, v] = number of edges u -> v."""
    a = torch.zeros(num_nodes, num_nodes, dtype=torch.long, device=edge_index.device)
    a.index_put_((edge_index[0], edge_index[1]), torch.ones_like(edge_index[0]), accumulate=True)
    return a


def path_counts(adjacency: torch.Tensor, n: int) -> torch.Tensor:
    """A^n: entry (u, v) counts the walks of length n from u to v."""
    if n < 0:
        raise ValueError(f"path_counts: n must be >= 0, got {n}")
    return torch.linalg.matrix_power(adjacency, n)


def degree_matrix(adjacency: torch.Tensor) -> torch.Tensor:
    """D = diag(row sums of A): |N(v)| for an undirected graph."""
    return torch.diag(adjacency.sum(dim=1))


def laplacian(adjacency: torch.Tensor) -> torch.Tensor:
    """L = D - A."""
    return degree_matrix(adjacency) - adjacency


def normalized_laplacian(adjacency: torch.Tensor) -> torch.Tensor:
    """L_sym = I - D^-1/2 A D^-1/2 (isolated nodes: a zero row and column of A)."""
    a = adjacency.double()
    deg = a.sum(dim=1)
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1e-300).rsqrt(), torch.zeros_like(deg))
    return torch.eye(len(a), dtype=a.dtype, device=a.device) - inv_sqrt[:, None] * a * inv_sqrt[None, :]


def _add_remaining_self_loops(edge_index, edge_weight, num_nodes, fill_value):
    """One self loop per node, appended after the other edges; an existing self
    loop keeps its weight (the last one if a node has several), the rest get
    ``fill_value``."""
    is_loop = edge_index[0] == edge_index[1]
    nodes = torch.arange(num_nodes, device=edge_index.device)
    edges = torch.cat([edge_index[:, ~is_loop], torch.stack([nodes, nodes])], dim=1)
    if edge_weight is None:
        return edges, None
    loop_weight = torch.full((num_nodes,), fill_value, dtype=edge_weight.dtype,
                             device=edge_weight.device)
    loop_nodes = edge_index[0, is_loop]
    if loop_nodes.numel():
        # last existing loop wins: scatter the loop positions, keep the largest
        position = torch.full((num_nodes,), -1, dtype=torch.long, device=edge_index.device)
        position = position.scatter_reduce(0, loop_nodes, torch.arange(loop_nodes.numel(),
                                           device=edge_index.device), reduce="amax")
        has_loop = position >= 0
        loop_weight = torch.where(has_loop, edge_weight[is_loop][position.clamp(min=0)],
                                  loop_weight)
    return edges, torch.cat([edge_weight[~is_loop], loop_weight])


class Graph:
    """A directed graph (use ``undirected=True`` to add reverse edges).

    Args:
        edge_index: ``(2, E)`` int tensor, edges ``edge_index[0] -> edge_index[1]``.
        num_nodes: defaults to ``edge_index.max() + 1``.
        undirected: add ``v -> u`` for every ``u -> v`` (duplicates removed;
            unweighted graphs only: pass both directions with their weights).
        self_loops: give every node one self loop ``v -> v``, as PyG's
            ``add_remaining_self_loops``: a node's existing self loop keeps its
            weight, the others get ``fill_value``.
        edge_weight: ``(E,)`` floating weights (``None``: all 1). Kept through
            ``self_loops``; used by :meth:`aggregate` and :meth:`gcn_weight`
            (weighted degrees).
        fill_value: weight of the added self loops (default 1, as PyG).

    The CSR indices are int32 when the graph fits (fewer than 2^31 nodes and
    edges; half the index traffic of int64), else int64.
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: Optional[int] = None,
                 undirected: bool = False, self_loops: bool = False,
                 edge_weight: Optional[torch.Tensor] = None, fill_value: float = 1.0):
        if not isinstance(edge_index, torch.Tensor) or edge_index.dim() != 2 \
                or edge_index.shape[0] != 2:
            raise ValueError("Graph: `edge_index` must be a (2, E) tensor")
        if edge_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Graph: `edge_index` must be int64 or int32, got {edge_index.dtype}")
        edge_index = edge_index.long()
        if num_nodes is None:
            num_nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
        if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
            raise ValueError(f"Graph: `edge_index` entries must be in [0, num_nodes = {num_nodes})")
        if edge_weight is not None:
            if not isinstance(edge_weight, torch.Tensor) or edge_weight.dim() != 1 \
                    or edge_weight.numel() != edge_index.shape[1] \
                    or not edge_weight.is_floating_point():
                raise ValueError(f"Graph: `edge_weight` must be a floating (E,) = "
                                 f"({edge_index.shape[1]},) tensor")
            if undirected:
                raise ValueError("Graph: `edge_weight` cannot be combined with undirected=True "
                                 "(pass both directions with their weights)")
        if undirected:
            edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        if self_loops:
            edge_index, edge_weight = _add_remaining_self_loops(edge_index, edge_weight,
                                                                num_nodes, fill_value)
        if (undirected or self_loops) and edge_weight is None:
            edge_index = torch.unique(edge_index, dim=1)
        # CSR rows are targets (row v: sources u of u -> v), sorted by (target, source).
        order = torch.argsort(edge_index[1] * max(num_nodes, 1) + edge_index[0], stable=True)
        self.edge_index = edge_index[:, order]
        self.edge_weight = None if edge_weight is None else edge_weight[order]
        self.num_nodes = num_nodes
        index_dtype = torch.int32 if max(num_nodes, self.edge_index.shape[1]) < 2 ** 31 \
            else torch.int64
        counts = torch.bincount(self.edge_index[1], minlength=num_nodes)
        self.rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(index_dtype)
        self.col = self.edge_index[0].to(index_dtype).contiguous()
        self._transpose = None
        self._gcn_weight = None

    @classmethod
    def from_adjacency(cls, adjacency: torch.Tensor) -> "Graph":
        """Edges u -> v for every nonzero A[u, v] (weights = the entries unless all 1)."""
        u, v = torch.nonzero(adjacency, as_tuple=True)
        weights = adjacency[u, v]
        weighted = not torch.all(weights == 1)
        return cls(torch.stack([u, v]), num_nodes=adjacency.shape[0],
                   edge_weight=weights.double() if weighted else None)

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    def in_degree(self) -> torch.Tensor:
        """|N(v)|: edges into each node."""
        return self.rowptr.diff().long()

    def transpose(self):
        """Cached CSR of the transpose, for backward passes."""
        if self._transpose is None:
            self._transpose = csr_transpose(self.rowptr, self.col, self.num_nodes)
        return self._transpose

    def gcn_weight(self, dtype=torch.float32) -> torch.Tensor:
        r"""Per-edge weights of :math:`\hat D^{-1/2} A \hat D^{-1/2}` (Kipf & Welling;
        build the graph with ``self_loops=True`` for :math:`A + I`), as PyG's
        ``gcn_norm``: :math:`w'_{uv} = d_u^{-1/2} w_{uv} d_v^{-1/2}` with the
        weighted in-degree :math:`d_v = \sum_{u \to v} w_{uv}` (0 where
        :math:`d_v = 0`). Computed in float32 (float64 for float64) and cached
        unless the weights require grad."""
        if self._gcn_weight is not None and self._gcn_weight.dtype == dtype:
            return self._gcn_weight
        acc = accumulation_dtype(dtype)
        src, dst = self.edge_index
        weight = torch.ones(self.num_edges, dtype=acc, device=src.device) \
            if self.edge_weight is None else self.edge_weight.to(acc)
        degree = torch.zeros(self.num_nodes, dtype=acc, device=src.device).index_add(0, dst, weight)
        inv_sqrt = degree.pow(-0.5)
        inv_sqrt = inv_sqrt.masked_fill(torch.isinf(inv_sqrt), 0.0)
        result = (inv_sqrt[src] * weight * inv_sqrt[dst]).to(dtype)
        if not result.requires_grad:
            self._gcn_weight = result
        return result

    def aggregate(self, x: torch.Tensor, reduce: str = "sum",
                  values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """out[v] = reduce over edges u -> v of (value *) x[u], via pyattn.spmm."""
        if values is None and self.edge_weight is not None:
            values = self.edge_weight.to(x.dtype)
        return spmm(self.rowptr, self.col, x, values, reduce, check=False,
                    transpose=self.transpose())

    def dense(self) -> torch.Tensor:
        return adjacency_matrix(self.edge_index, self.num_nodes)

    def to(self, device) -> "Graph":
        """A copy on ``device`` (cached tensors moved too)."""
        other = object.__new__(Graph)
        other.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                               for k, v in self.__dict__.items()})
        if self._transpose is not None:
            other._transpose = tuple(t.to(device) for t in self._transpose)
        return other

    def __repr__(self) -> str:
        return f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges})"
