r"""ROT-Pooling (spec §6) against a dense per-set float64 reference written out here, and its properties."""
import math
from pathlib import Path

import pytest
import torch

from uotp_geometric.functional import uot_plan, uot_pool
from uotp_geometric.segment import Segments
from uotp_geometric.solvers.rot import structure, structure_product
from tests.uotp_geometric.helpers import ragged_batch

INF = math.inf
SOLVERS = ['sinkhorn', 'badmm']
SIZES = [1, 2, 5, 13, 40, 7, 29]  # sets of 1 to 40 nodes


def dense_similarities(x):
    r"""C_N = X X^T / D and C_D = X^T X / N of one set, each divided by its largest entry (1 if 0)."""
    num_nodes, num_dims = x.shape
    c_n, c_d = x @ x.T / num_dims, x.T @ x / num_nodes
    return [c / (c.max() if c.max() > 0 else 1.0) for c in (c_n, c_d)]


def weight(lam, scale):
    r"""lam / (lam + scale), with its limits at lam = inf (1) and lam = 0 (0)."""
    return 1.0 if lam == INF else lam / (lam + scale)


def dense_proximal_sinkhorn(x, p, q, eps, lam_p, lam_q, gw, tau, inner_iters):
    r"""Spec §6, proximal Sinkhorn, for one set; every value is a list with one entry per outer step."""
    c_n, c_d = dense_similarities(x)
    plan = q[:, None] * p[None, :]
    for m in range(len(eps)):
        score = x + gw[m] * c_n @ plan @ c_d + tau[m] * plan.log()
        entropy = eps[m] + tau[m]
        c_p, c_q = weight(lam_p[m], entropy), weight(lam_q[m], entropy)
        u, v = torch.zeros_like(p), torch.zeros_like(q)
        for _ in range(inner_iters):
            u = c_p * (p.log() - torch.logsumexp(score / entropy + v[:, None], dim=0))
            v = c_q * (q.log() - torch.logsumexp(score / entropy + u[None, :], dim=1))
        plan = torch.exp(score / entropy + u[None, :] + v[:, None])
    return plan


def dense_badmm(x, p, q, eps, lam_p, lam_q, rho, gw):
    r"""Spec §6, Bregman ADMM with the bilinear split, for one set; values are per-iteration lists."""
    c_n, c_d = dense_similarities(x)
    log_s = q.log()[:, None] + p.log()[None, :]
    dual = torch.zeros_like(log_s)
    for k in range(len(eps)):
        g = log_s + (x + gw[k] / 2 * c_n @ log_s.exp() @ c_d - dual) / rho[k]
        log_r = torch.logsumexp(g, dim=1, keepdim=True)
        w_q = 1 - weight(lam_q[k], rho[k])
        log_t = g - log_r + w_q * log_r + (1 - w_q) * q.log()[:, None]
        h = (dual + gw[k] / 2 * c_n @ log_t.exp() @ c_d + rho[k] * log_t) / (eps[k] + rho[k])
        log_c = torch.logsumexp(h, dim=0, keepdim=True)
        w_p = 1 - weight(lam_p[k], eps[k] + rho[k])
        log_s = h - log_c + w_p * log_c + (1 - w_p) * p.log()[None, :]
        dual = dual + rho[k] * (log_t.exp() - log_s.exp())
    return log_s.exp()


def _priors(index, num_dims, uniform, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_sets = int(index.max()) + 1
    if uniform:
        count = torch.bincount(index, minlength=num_sets).double()
        return torch.full((num_sets, num_dims), 1.0 / num_dims, dtype=torch.float64), 1 / count[index]
    return (torch.rand(num_sets, num_dims, generator=gen, dtype=torch.float64) + 0.1,
            torch.rand(index.numel(), generator=gen, dtype=torch.float64) + 0.1)


def test_structure_product_matches_dense_similarities():
    # Unsorted sets of 1 to 40 nodes, two empty sets and an all-zero set (normaliser 1).
    sizes = [1, 3, 0, 7, 40, 2, 17, 0, 5, 4]
    x, index = ragged_batch(sizes, 6, shuffle=True, seed=1)
    x[index == 9] = 0
    plan = torch.rand_like(x)
    out = structure_product(structure(x, Segments(index, len(sizes))), plan)
    for b, size in enumerate(sizes):
        if size:
            c_n, c_d = dense_similarities(x[index == b])
            expected = c_n @ plan[index == b] @ c_d
            torch.testing.assert_close(out[index == b], expected, rtol=0, atol=1e-13)
    assert out[index == 9].abs().max() == 0 and out.abs().max() > 0.1


@pytest.mark.parametrize('solver', SOLVERS)
def test_zero_gw_is_uot_bit_for_bit(solver):
    x, index = ragged_batch(SIZES, 5, shuffle=True)
    kwargs = dict(solver=solver, eps=0.6, lam_p=1.5, lam_q=0.4, num_iters=6)
    for gw in (0, 0.0, torch.zeros(6, dtype=x.dtype), [0.0] * 6):
        assert torch.equal(uot_plan(x, index, gw=gw, **kwargs), uot_plan(x, index, **kwargs))
        assert torch.equal(uot_pool(x, index, gw=gw, prox=0.3, inner_iters=2, **kwargs),
                           uot_pool(x, index, **kwargs))


@pytest.mark.parametrize('solver', SOLVERS)
def test_structured_solver_without_structure_is_uot(solver):
    # A learned gw forces the structured solver; at gw = 0 (and tau = 0 for proximal Sinkhorn, whose
    # outer steps then all solve the same problem) it must give spec §1's plan: J Sinkhorn iterations.
    x, index = ragged_batch(SIZES, 5, shuffle=True)
    gw = torch.zeros((), dtype=x.dtype, requires_grad=True)
    kwargs = dict(solver=solver, eps=0.6, lam_p=1.5, lam_q=0.4)
    if solver == 'sinkhorn':
        plan = uot_plan(x, index, gw=gw, prox=0.0, inner_iters=7, num_iters=3, **kwargs)
        expected = uot_plan(x, index, num_iters=7, **kwargs)
    else:
        plan = uot_plan(x, index, gw=gw, num_iters=7, **kwargs)
        expected = uot_plan(x, index, num_iters=7, **kwargs)
    assert torch.equal(plan.detach(), expected)
    changed = uot_plan(x, index, gw=gw.detach() + 0.5, num_iters=7, **kwargs)
    assert (changed - expected).abs().max() > 1e-3  # the term does act


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('uniform', [True, False])
@pytest.mark.parametrize('lam_p,lam_q', [(INF, 1.0), (0.5, INF), (INF, 0.0), (0.0, 2.0)])
def test_matches_dense_reference(solver, uniform, lam_p, lam_q):
    x, index = ragged_batch(SIZES, 5, shuffle=True, seed=2)
    p, q = _priors(index, 5, uniform)
    num_iters = 6 if solver == 'sinkhorn' else 15
    # Per-iteration eps and gw, a scalar lam_p, lam_q and tau (or rho).
    eps = torch.linspace(0.6, 1.1, num_iters, dtype=x.dtype)
    gw = torch.linspace(0.8, 0.2, num_iters, dtype=x.dtype)
    step = 0.7
    plan = uot_plan(x, index, solver=solver, eps=eps, lam_p=lam_p, lam_q=lam_q, gw=gw,
                    prox=step, rho=step, inner_iters=3, num_iters=num_iters,
                    p=None if uniform else p, q=None if uniform else q)
    values = dict(eps=eps.tolist(), lam_p=[lam_p] * num_iters, lam_q=[lam_q] * num_iters,
                  gw=gw.tolist())
    worst = 0.0
    for b in range(len(SIZES)):
        rows = index == b
        if solver == 'sinkhorn':
            expected = dense_proximal_sinkhorn(x[rows], p[b], q[rows], tau=[step] * num_iters,
                                               inner_iters=3, **values)
        else:
            expected = dense_badmm(x[rows], p[b], q[rows], rho=[step] * num_iters, **values)
        worst = max(worst, (plan[rows] - expected).abs().max().item())
    assert worst <= 1e-8, worst


@pytest.mark.parametrize('gw,lam_p,lam_q', [(0.1, 1.0, 0.5), (0.3, INF, 1.0)])
def test_solvers_agree_at_convergence(gw, lam_p, lam_q):
    x, index = ragged_batch([3, 11, 24], 4, shuffle=True, seed=3)
    kwargs = dict(eps=1.0, lam_p=lam_p, lam_q=lam_q, gw=gw)
    # Proximal Sinkhorn converges fast with a small tau; BADMM slowly (its error falls like 1 / K with a
    # hard marginal), fastest with a large step.
    sinkhorn = uot_plan(x, index, solver='sinkhorn', prox=0.1, inner_iters=30, num_iters=30, **kwargs)
    badmm = uot_plan(x, index, solver='badmm', rho=16.0, num_iters=800, **kwargs)
    assert (sinkhorn - badmm).abs().max() <= 1e-4
    # The structure term moved the plan by several times the tolerance: the two agree on its optimum,
    # not merely on the plain UOT plan.
    plain = uot_plan(x, index, solver='sinkhorn', num_iters=300, eps=1.0, lam_p=lam_p, lam_q=lam_q)
    assert (sinkhorn - plain).abs().max() > 5e-4


@pytest.mark.parametrize('solver', SOLVERS)
def test_a_graph_does_not_depend_on_its_batch_mates(solver):
    # In float64, so that the tolerance is far below what a batch mate's influence would be, and far above
    # the rounding of a different order of summation.
    gen = torch.Generator().manual_seed(4)
    alone = torch.randn(9, 16, generator=gen, dtype=torch.float64)
    # Batch mates with far larger features: a batch-wide normaliser would change the output.
    mates = 50 * torch.randn(30, 16, generator=gen, dtype=torch.float64)
    x = torch.cat([mates[:12], alone, mates[12:]])
    index = torch.cat([torch.zeros(12), torch.ones(9), torch.full((18,), 2)]).long()
    perm = torch.randperm(x.size(0), generator=gen)
    kwargs = dict(solver=solver, eps=0.5, lam_p=INF, lam_q=1.0, gw=2.0, num_iters=5)
    expected = uot_pool(alone, torch.zeros(9, dtype=torch.long), **kwargs)[0]
    out = uot_pool(x[perm], index[perm], **kwargs)[1]
    assert (out - expected).abs().max() <= 1e-10


def _values(solver, dtype):
    values = dict(eps=torch.tensor([0.9, 0.6, 0.7], dtype=dtype),
                  lam_p=torch.tensor(1.5, dtype=dtype), lam_q=torch.tensor(0.5, dtype=dtype),
                  gw=torch.tensor([0.8, 0.3, 1.2], dtype=dtype))
    values['prox' if solver == 'sinkhorn' else 'rho'] = torch.tensor(0.8, dtype=dtype)
    return values


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('solver', SOLVERS)
def test_gradcheck(solver):
    x, index = ragged_batch([3, 0, 4], 3, seed=5)
    gen = torch.Generator().manual_seed(5)
    p = torch.rand(3, 3, generator=gen, dtype=x.dtype) + 0.2
    q = torch.rand(x.size(0), generator=gen, dtype=x.dtype) + 0.2
    values = _values(solver, x.dtype)
    names = list(values)

    def pool(x, p, q, *vals):
        return uot_pool(x, index, 3, solver=solver, p=p, q=q, num_iters=3, inner_iters=2,
                        **dict(zip(names, vals)))

    inputs = [t.requires_grad_(True) for t in (x, p, q, *values.values())]
    assert torch.autograd.gradcheck(pool, inputs)


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('solver', SOLVERS)
def test_memory_efficient_gradients_equal_autograd(solver):
    x, index = ragged_batch([4, 0, 9, 1, 6], 5, shuffle=True, seed=6)
    gen = torch.Generator().manual_seed(6)
    p = torch.rand(5, 5, generator=gen, dtype=x.dtype) + 0.1
    q = torch.rand(x.size(0), generator=gen, dtype=x.dtype) + 0.1
    values = _values(solver, x.dtype)
    results = []
    for memory_efficient in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, p, q, *values.values())]
        x_, p_, q_, *vals = leaves
        out = uot_pool(x_, index, 5, solver=solver, p=p_, q=q_, num_iters=3, inner_iters=3,
                       memory_efficient=memory_efficient, **dict(zip(values, vals)))
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out, [t.grad for t in leaves]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for name, lean, plain in zip(['x', 'p', 'q', *values], results[0][1], results[1][1]):
        assert plain.abs().max() > 0, name  # the comparison is not vacuous
        torch.testing.assert_close(lean, plain, rtol=0, atol=1e-10, msg=name)


def _memory_mib(key):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024


@pytest.mark.parametrize('solver', SOLVERS)
def test_no_node_by_node_matrix(solver):
    # One float32 20000 x 20000 matrix takes 1.6 GB; the forward and backward of a 20000-node set must
    # stay far below that. Measured as the peak resident memory (Linux: VmHWM, reset through
    # clear_refs) above the resident memory before the call. In a fresh process it was 130 MiB with every
    # large block mapped (the benchmark's setting) and 300-330 MiB through glibc's heap, both solvers.
    def run(num_nodes):
        x = torch.randn(num_nodes, 64, requires_grad=True)
        out = uot_pool(x, torch.zeros(num_nodes, dtype=torch.long), 1, solver=solver, gw=0.5,
                       lam_p=INF, num_iters=3)
        out.square().sum().backward()

    run(100)
    Path('/proc/self/clear_refs').write_text('5')
    before = _memory_mib('VmRSS')
    run(20000)
    extra = _memory_mib('VmHWM') - before
    assert extra < 512, extra
