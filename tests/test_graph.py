"""Graphs, the seed's matrix facts (Q3.1), graph layers (Q3.2), data sets, the example."""
import os

import pytest
import torch

from pyattn import graph as G
from pyattn.datasets import karate_club, load_planetoid, safe_unpickle
from pyattn.nn import GCNConv, GraphConv, MessagePassing
from conftest import data_path, requires_data

PLANETOID = data_path("planetoid")
requires_planetoid = requires_data("planetoid", "ind.cora.graph")

# The seed's Q3.1 graphs, from its adjacency matrices (nodes 1..n there, 0..n-1 here).
LEFT = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 1, 0, 0],
                     [1, 0, 0, 0, 0]])
RIGHT = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 0],
                      [0, 0, 1, 0, 1, 1], [0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 0]])


def test_seed_a_squared_and_laplacian():
    a2 = G.path_counts(LEFT, 2)
    assert a2.tolist() == [[3, 1, 1, 1, 0], [1, 2, 1, 1, 1], [1, 1, 3, 0, 1], [1, 1, 0, 1, 0],
                           [0, 1, 1, 0, 1]]
    assert G.laplacian(RIGHT).tolist() == [
        [1, -1, 0, 0, 0, 0], [-1, 3, -1, 0, -1, 0], [0, -1, 2, -1, 0, 0],
        [0, 0, -1, 3, -1, -1], [0, -1, 0, -1, 3, -1], [0, 0, 0, -1, -1, 2]]
    assert torch.diag(G.degree_matrix(RIGHT)).tolist() == [1, 3, 2, 3, 3, 2]


def test_path_counts_count_walks():
    # walks of length 3 from node 0 back to 0 in the left graph, by enumeration
    n = len(LEFT)
    walks = sum(1 for a in range(n) for b in range(n)
                if LEFT[0, a] and LEFT[a, b] and LEFT[b, 0])
    assert G.path_counts(LEFT, 3)[0, 0].item() == walks


def test_which_nodes_change_most_under_laplacian():
    # F = L X: row v is deg(v) x_v - sum of neighbours. With random features the
    # largest change is not always at the highest degree; the expected squared
    # change E|F_v|^2 = deg(v)^2 + deg(v) for i.i.d. unit features is.
    lap = G.laplacian(RIGHT).double()
    expected = (lap ** 2).sum(1)  # = deg^2 + deg
    deg = RIGHT.sum(1).double()
    torch.testing.assert_close(expected, deg ** 2 + deg)
    most = torch.nonzero(expected == expected.max()).flatten().tolist()
    assert most == [1, 3, 4]  # the seed's nodes 2, 4, 5 (degree 3), not "2, 3 and 5"
    assert torch.argmin(expected).item() == 0  # the seed's node 1 changes least
    x = torch.randn(6, 20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    empirical = ((lap @ x) ** 2).mean(1)
    torch.testing.assert_close(empirical, expected, rtol=0.05, atol=0)


def test_normalized_laplacian_and_dense_round_trip():
    g = G.Graph.from_adjacency(RIGHT)
    assert torch.equal(g.dense(), RIGHT)
    lsym = G.normalized_laplacian(RIGHT)
    torch.testing.assert_close(torch.diag(lsym), torch.ones(6, dtype=torch.float64))
    eig = torch.linalg.eigvalsh(lsym)
    assert eig.min() > -1e-12 and eig.max() < 2 + 1e-12


def test_graph_construction_options():
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    g = G.Graph(edge_index, undirected=True, self_loops=True)
    assert g.num_edges == 6 + 3 and g.in_degree().tolist() == [3, 3, 3]
    torch.testing.assert_close(g.aggregate(torch.eye(3), "sum"), torch.ones(3, 3))
    assert g.to("cpu").num_edges == g.num_edges
    with pytest.raises(ValueError, match=r"\[0, num_nodes"):
        G.Graph(torch.tensor([[0], [5]]), num_nodes=3)
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        G.Graph(torch.tensor([0, 1]))


def test_graphconv_is_eq6_and_message_passing():
    torch.manual_seed(0)
    g = G.Graph.from_adjacency(RIGHT)
    x = torch.randn(6, 5, dtype=torch.float64)
    for out in (3, 8):  # out < in: transform first; out > in: aggregate first
        conv = GraphConv(5, out, activation=torch.relu).double()
        w, b = conv.neighbour.weight, conv.self_weight.weight
        a = RIGHT.double()
        eq6 = torch.relu((a / a.sum(1, keepdim=True)) @ x @ w.T + x @ b.T)
        torch.testing.assert_close(conv(x, g), eq6)
        mpnn = MessagePassing(message=lambda h_v, h_u, e_uv, deg_v: h_u / deg_v,
                              update=lambda h, m: torch.relu(m @ w.T + h @ b.T))
        torch.testing.assert_close(mpnn(x, g), eq6)


def test_gcnconv_matches_dense_formula():
    torch.manual_seed(0)
    g = G.Graph.from_adjacency(LEFT)
    g_loops = G.Graph(g.edge_index, 5, self_loops=True)
    conv = GCNConv(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    a = LEFT.double() + torch.eye(5, dtype=torch.float64)
    d = a.sum(1).rsqrt()
    expected = d[:, None] * a * d[None, :] @ x @ conv.linear.weight.T + conv.bias
    torch.testing.assert_close(conv(x, g_loops), expected)


def test_karate_club_is_built_in():
    data = karate_club()
    assert data.num_nodes == 34 and data.edge_index.shape == (2, 156) and data.num_classes == 2
    assert (data.train_mask.sum(), data.val_mask.sum(), data.test_mask.sum()) == (8, 8, 18)


@requires_planetoid
def test_planetoid_cora_and_citeseer():
    cora = load_planetoid(PLANETOID, "cora")
    assert cora.x.shape == (2708, 1433) and cora.edge_index.shape[1] == 10556
    assert (cora.train_mask.sum(), cora.val_mask.sum(), cora.test_mask.sum()) == (140, 500, 1000)
    assert cora.num_classes == 7
    citeseer = load_planetoid(PLANETOID, "citeseer")
    assert citeseer.x.shape == (3327, 3703) and citeseer.num_classes == 6
    assert citeseer.test_mask.sum() == 1000 and (citeseer.x.sum(1) == 0).sum() >= 15


def test_planetoid_loader_refuses_other_classes_and_missing_files(tmp_path):
    import pickle
    evil = pickle.dumps(os.system, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        safe_unpickle(evil)
    with pytest.raises(FileNotFoundError, match="ind.cora.x"):
        load_planetoid(str(tmp_path), "cora")
    with pytest.raises(ValueError, match="unknown Planetoid"):
        load_planetoid(str(tmp_path), "pubmed2")


def _gcn_example():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "gcn_example", os.path.join(os.path.dirname(__file__), "..", "examples", "gcn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gcn_example_on_karate_club_reaches_an_accuracy_bound(capsys):
    accuracies = _gcn_example().main(["--dataset", "karate", "--seeds", "2", "--epochs", "50"])
    assert len(accuracies) == 2
    # 2-class karate club, 8 labelled nodes: GCN reaches 94% in 30 epochs; chance is 50%
    assert min(accuracies) >= 80.0, accuracies
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test accuracy: ")


@requires_planetoid
def test_gcn_example_defaults_to_shipped_cora(capsys):
    _gcn_example().main(["--seeds", "1", "--epochs", "1"])
    assert "gcn on cora, 1 seeds" in capsys.readouterr().out


# -- weighted graphs (issue 11): PyG's gcn_norm, computed by hand -------------

def _weighted_example():
    # 0 -> 1 (0.5), 1 -> 0 (2.0), 1 -> 2 (1.5), 2 -> 3 (3.0), 3 -> 3 (2.5: a self loop)
    edge_index = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 3, 3]])
    weight = torch.tensor([0.5, 2.0, 1.5, 3.0, 2.5], dtype=torch.float64)
    return edge_index, weight


def _dense_gcn(edge_index, weight, num_nodes, fill_value=1.0):
    """D^-1/2 (A + I) D^-1/2 as PyG's add_remaining_self_loops + gcn_norm, with A[v, u]
    = weight of u -> v (rows aggregate), existing self loops keeping their weight."""
    a = torch.zeros(num_nodes, num_nodes, dtype=torch.float64)
    for (u, v), w in zip(edge_index.T.tolist(), weight.tolist()):
        a[v, u] += w
    has_loop = torch.zeros(num_nodes, dtype=torch.bool)
    has_loop[[u for u, v in edge_index.T.tolist() if u == v]] = True
    diag = torch.where(has_loop, torch.diagonal(a), torch.full((num_nodes,), fill_value,
                                                                dtype=torch.float64))
    a = a - torch.diag(torch.diagonal(a)) + torch.diag(diag)
    deg = a.sum(1)  # weighted in-degree of each target
    d = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    return d[:, None] * a * d[None, :]


@pytest.mark.parametrize("fill_value", [1.0, 2.0])
def test_weighted_gcnconv_matches_pyg_formula(fill_value):
    torch.manual_seed(0)
    edge_index, weight = _weighted_example()
    g = G.Graph(edge_index, 4, self_loops=True, edge_weight=weight, fill_value=fill_value)
    assert g.num_edges == 4 + 4 and g.edge_weight is not None
    conv = GCNConv(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = _dense_gcn(edge_index, weight, 4, fill_value) @ x @ conv.linear.weight.T + conv.bias
    torch.testing.assert_close(conv(x, g), expected)
    unweighted = G.Graph(edge_index, 4, self_loops=True)
    assert not torch.allclose(conv(x, unweighted), expected)  # the weights matter
    # spmm uses the weights as well: aggregate = A_w x
    plain = G.Graph(edge_index, 4, edge_weight=weight)
    a = torch.zeros(4, 4, dtype=torch.float64)
    a[edge_index[1], edge_index[0]] = weight
    torch.testing.assert_close(plain.aggregate(x, "sum"), a @ x)


def test_weighted_graph_refuses_bad_weights():
    edge_index, weight = _weighted_example()
    with pytest.raises(ValueError, match=r"floating \(E,\)"):
        G.Graph(edge_index, 4, edge_weight=weight[:3])
    with pytest.raises(ValueError, match="undirected"):
        G.Graph(edge_index, 4, undirected=True, edge_weight=weight)


def test_zero_edge_graph():
    g = G.Graph(torch.zeros(2, 0, dtype=torch.long), num_nodes=3)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for reduce in ("sum", "mean", "max", "min"):
        assert torch.equal(g.aggregate(x, reduce), torch.zeros(3, 4, dtype=torch.float64))
    conv = GCNConv(4, 2).double()
    loops = G.Graph(torch.zeros(2, 0, dtype=torch.long), num_nodes=3, self_loops=True)
    torch.testing.assert_close(conv(x, loops), x @ conv.linear.weight.T + conv.bias)
    torch.testing.assert_close(conv(x, g), conv.bias.expand(3, 2))
    conv(x, g).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_graph_indices_are_int32_when_they_fit():
    g = G.Graph(torch.tensor([[0, 1, 2], [1, 2, 0]]))
    assert g.rowptr.dtype == g.col.dtype == torch.int32
    assert g.transpose()[0].dtype == torch.int32
