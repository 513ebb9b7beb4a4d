"""Graph convolution layers on :func:`pyattn.spmm`."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from pyattn.graph import Graph


class GraphConv(nn.Module):
    r"""The seed's graph convolution (eq. 6), a mean aggregation with a self term:

    .. math::
        h_v' = \sigma\Big(W \frac{1}{|N(v)|} \sum_{u \in N(v)} h_u + B h_v\Big)

    The mean runs through ``pyattn.spmm(reduce='mean')``. When
    ``out_features < in_features`` the features are transformed before they are
    aggregated (the mean is linear, so the result is the same, and cheaper).

    Args:
        in_features, out_features: sizes of h and h'.
        bias: add a bias to the sum (eq. 6 has none).
        activation: sigma, or ``None`` to leave it to the caller.

    Shapes: x ``(num_nodes, in_features)`` -> ``(num_nodes, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 activation: Optional[Callable] = None):
        super().__init__()
        self.neighbour = nn.Linear(in_features, out_features, bias=False)  # W
        self.self_weight = nn.Linear(in_features, out_features, bias=bias)  # B
        self.activation = activation

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        if self.neighbour.out_features < self.neighbour.in_features:
            aggregated = graph.aggregate(self.neighbour(x), "mean")
        else:
            aggregated = self.neighbour(graph.aggregate(x, "mean"))
        out = aggregated + self.self_weight(x)
        return self.activation(out) if self.activation is not None else out

    def extra_repr(self) -> str:
        return f"{self.neighbour.in_features}, {self.neighbour.out_features}"


class GCNConv(nn.Module):
    r"""Kipf & Welling's graph convolution:
    :math:`X' = \hat D^{-1/2} (A + I) \hat D^{-1/2} X W (+ b)`, with
    :math:`\hat D` the (weighted) degrees of :math:`A + I`, as PyG's ``gcn_norm``.
    Build the graph with ``self_loops=True``; a weighted graph
    (``Graph(..., edge_weight=w)``) uses its weights, the added self loops
    weigh ``fill_value`` (default 1). The normalised weights are cached on the graph.

    Shapes: x ``(num_nodes, in_features)`` -> ``(num_nodes, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.xavier_uniform_(self.linear.weight)

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        h = self.linear(x)
        out = graph.aggregate(h, "sum", values=graph.gcn_weight(h.dtype))
        return out + self.bias if self.bias is not None else out


class MessagePassing(nn.Module):
    r"""Reference message passing (Gilmer et al. 2017), one edge at a time in PyTorch:

    .. math::
        m_v = \sum_{u \in N(v)} \mathrm{message}(h_v, h_u, e_{uv}), \qquad
        h_v' = \mathrm{update}(h_v, m_v)

    ``message(h_v, h_u, e_uv, degree_v)`` gets per-edge tensors (``e_uv`` the
    edge weight or ``None``, ``degree_v`` = |N(v)|), ``update(h, m)`` per-node ones.
    """

    def __init__(self, message: Callable, update: Callable):
        super().__init__()
        self.message, self.update = message, update

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        src, dst = graph.edge_index
        degree = graph.in_degree().to(x.dtype)
        messages = self.message(x[dst], x[src], graph.edge_weight, degree[dst][:, None])
        summed = torch.zeros(x.shape[0], messages.shape[1], dtype=messages.dtype,
                             device=x.device).index_add(0, dst, messages)
        return self.update(x, summed)
