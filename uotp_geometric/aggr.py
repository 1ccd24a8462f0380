r"""UOT-Pooling as a PyG aggregation."""
import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Linear, Parameter
from torch_geometric.nn.aggr import Aggregation

from uotp_geometric.functional import (SOLVERS, SolverOptions, Value, solve_dtype, uot_plan,
                                       uot_pool)
from uotp_geometric.segment import Segments, infer_num_sets, segment_count, segment_logsumexp

__all__ = ['UOTAggregation', 'PRIORS', 'PRESETS']

PRIORS = ('uniform', 'attention', 'counting', 'power')
INF = math.inf
InitialValue = Union[float, Tuple[float, ...]]

# Each preset is the setting of spec §4 under which the UOT problem (Sinkhorn) or the BADMM iteration
# gives a classic pooling; see README's "one layer, every pooling" table.
_LIMIT = dict(lam_p=INF, lam_q=INF)
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    # eps -> inf with hard marginals gives T = p q^T / m after one Sinkhorn iteration, m the priors'
    # common mass: p q^T for mean (m = 1), entries 1/D for sum (p = N/D, q = 1, m = N). BADMM starts at
    # S = p q^T, its first block rescales the rows to q (the same T), and a step rho -> inf keeps it.
    'mean': dict(sinkhorn=dict(eps=1e6, num_iters=1, **_LIMIT),
                 badmm=dict(eps=0.0, rho=1e6, num_iters=1, **_LIMIT)),
    # softmax over each set with temperature t: free node marginal, hard dimension marginal.
    'softmax': dict(sinkhorn=dict(lam_p=INF, lam_q=0.0, num_iters=1),
                    badmm=dict(lam_p=INF, lam_q=0.0, rho=1.0, num_iters=50)),
    # max: the softmax setting as the temperature goes to 0. Sinkhorn stops at eps = 0.02, where the
    # float32 gradient with respect to eps has not yet underflowed, so learn=True can leave max;
    # BADMM reaches eps = 0 itself.
    'max': dict(sinkhorn=dict(eps=2e-2, lam_p=INF, lam_q=0.0, num_iters=1),
                badmm=dict(eps=0.0, lam_p=INF, lam_q=0.0, rho=1.0,
                           num_iters=50)),
}
# BADMM-Q at eps = 0 is BADMM at eps = 0 (spec §7), so the presets that set eps = 0 carry over. Its
# softmax limit is not softmax pooling (a quadratic regulariser gives sparse plans), so it has none.
PRESETS['mean']['badmm_q'] = PRESETS['mean']['badmm']
PRESETS['max']['badmm_q'] = PRESETS['max']['badmm']
PRESETS['sum'] = {k: dict(v, prior='counting') for k, v in PRESETS['mean'].items()}
PRESETS['attention'] = {k: dict(v, prior='attention') for k, v in PRESETS['mean'].items()}


def _inverse_softplus(value: Tensor) -> Tensor:
    # softplus(y) = value  <=>  y = value + log(1 - exp(-value)), stable for large and small values.
    return value + torch.log(-torch.expm1(-value))


def _initial(value: Value) -> InitialValue:
    r"""An initial value as a float, or as a tuple of floats where it has one entry per iteration."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
    values = torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()
    return values[0] if len(values) == 1 else tuple(values)


def _format(value: Tensor) -> str:
    # One number where all iterations share it (per_iteration is shown beside), else one per iteration.
    values = [f'{v:.3g}' for v in value.detach().float().cpu().tolist()]
    return values[0] if len(set(values)) == 1 else '[' + ', '.join(values) + ']'


class UOTAggregation(Aggregation):
    r"""UOT-Pooling from `"Revisiting Global Pooling through the Lens of Optimal Transport"
    <https://arxiv.org/abs/2201.09191>`_: every set is pooled by solving an unbalanced optimal
    transport problem between its elements and the feature dimensions.

    For a set with features :math:`X \in \mathbb{R}^{N \times D}`, the plan

    .. math::
        T^\star = \operatorname*{argmin}_{T \geq 0} \; -\langle X, T \rangle
        + \varepsilon \sum T (\log T - 1)
        + \lambda_p \operatorname{KL}(T^\top \mathbf{1} \,\|\, p)
        + \lambda_q \operatorname{KL}(T \mathbf{1} \,\|\, q)

    is approximated by :obj:`num_iters` iterations of Sinkhorn scaling or Bregman ADMM, and the output
    is :math:`z = D \sum_n x_n \odot T^\star_n`. With :math:`p = \mathbf{1}/D` and the prior :math:`q`
    chosen by :obj:`prior`, the layer contains mean, sum, max, softmax and attention pooling as special
    cases (:meth:`from_preset`), and learns :math:`\varepsilon, \lambda_p, \lambda_q` (and
    :math:`\rho`) otherwise.

    With :obj:`gw` :math:`= \gamma > 0` it is ROT-Pooling (Xu & Cheng, TPAMI 2023): the objective gains
    :math:`-\frac{\gamma}{2} \langle C_N T C_D, T \rangle`, which rewards plans that align the nodes'
    similarity :math:`C_N \propto X X^\top` with the dimensions' similarity :math:`C_D \propto X^\top X`
    (each normalised per set; spec §6, :mod:`uotp_geometric.solvers.rot`), and :math:`\gamma` is learned
    like the other values.

    Sets are given by :obj:`index` (or :obj:`ptr`) over the flat input, without padding. Inputs with
    extra axes, such as :obj:`[num_edges, heads, channels]`, pool each of those axes independently over
    the feature axis (the last one). Half inputs (a model cast to :obj:`torch.bfloat16`) are solved in
    float32 and the output has the input's dtype; under autocast the solve is a float32 op, as softmax
    is, and returns float32. An input with no feature columns gives the empty ``(B, 0)`` output.

    :obj:`eps`, :obj:`lam_p`, :obj:`lam_q`, :obj:`rho`, :obj:`gw` and :obj:`prox` each take a number or
    a sequence or tensor of shape ``(num_iters,)``, one initial value per iteration, which makes the
    layer :obj:`per_iteration`. :func:`repr` shows the current (learned) values, and :meth:`value`
    returns them.

    Args:
        solver (str): ``"sinkhorn"``, ``"badmm"`` or ``"badmm_q"`` (the quadratic regulariser
            :math:`\frac{\varepsilon}{2} \|T\|_F^2` in place of the entropy, spec §7).
            (default: ``"sinkhorn"``)
        num_iters (int): The number of unrolled solver iterations ``K``. (default: ``4``)
        eps (float or Tensor): Initial entropic regularisation :math:`\varepsilon` (``> 0`` for
            Sinkhorn, ``>= 0`` for the BADMMs). (default: ``1.0``)
        lam_p (float or Tensor): Initial :math:`\lambda_p \geq 0` (``inf``: hard marginal). The
            default keeps the dimension marginal hard, so the pooled mass stays 1 and supervised training
            starts stably: with the paper's :math:`\lambda_p = 1` the mass grows like
            :math:`\exp(|x| / \varepsilon)` and training diverges. Pass ``lam_p=1.0`` for the
            paper's setting, or use :meth:`from_preset` for a classic pooling.
            (default: ``inf``)
        lam_q (float or Tensor): Initial :math:`\lambda_q \geq 0`. (default: ``1.0``)
        rho (float or Tensor): Initial BADMM step :math:`\rho > 0`. (default: ``1.0``)
        learn (bool): If :obj:`True`, the finite, positive values among :obj:`eps`, :obj:`lam_p`,
            :obj:`lam_q` (and :obj:`rho` for the BADMMs, :obj:`gw` and :obj:`prox` where given) are
            learned, kept positive by a softplus;
            ``0`` and ``inf`` stay fixed (as does a per-iteration value with such an entry).
            (default: :obj:`True`)
        per_iteration (bool): If :obj:`True`, each iteration has its own values; implied by a value
            given per iteration. (default: :obj:`False`)
        prior (str): The node prior :math:`q`: ``"uniform"`` (:math:`1/N`), ``"attention"`` (a
            softmax over the set of a learned linear score, needs :obj:`channels`), ``"counting"``
            (:math:`q = \mathbf{1}`, :math:`p = (N/D)\mathbf{1}`: unnormalised, as sum pooling needs)
            or ``"power"`` (:math:`q = N^{a-1}\mathbf{1}`, :math:`p = (N^a/D)\mathbf{1}`: a plan of
            mass :math:`N^a` between mean (:math:`a = 0`) and sum (:math:`a = 1`), with the
            exponent :math:`a \in [0, 1]` learned from :obj:`mass_exponent`; spec §8).
            (default: ``"uniform"``)
        channels (int, optional): Input feature size, for ``prior="attention"``. (default: :obj:`None`)
        memory_efficient (bool): If :obj:`True`, the backward is the solvers' hand-derived adjoint,
            which recomputes what it needs instead of storing it (BADMM stores it where it fits in
            256 MiB, which is faster), so training memory hardly grows with :obj:`num_iters`;
            :obj:`False` uses plain autograd through the unrolled iterations. (default: :obj:`True`)
        gw (float or Tensor): Initial weight :math:`\gamma \geq 0` of the structure term; ``0`` runs
            plain UOT-Pooling and stays fixed. (default: ``0.0``)
        prox (float or Tensor): Initial proximal weight :math:`\tau \geq 0` of proximal Sinkhorn,
            the solver of ``solver="sinkhorn"`` when ``gw > 0``; learned like :obj:`rho`.
            (default: ``1.0``)
        inner_iters (int): Sinkhorn iterations per outer step of proximal Sinkhorn, whose
            :obj:`num_iters` outer steps each take a structure step. (default: ``4``)
        mass_exponent (float): Initial exponent :math:`a \in [0, 1]` of ``prior="power"``, learned
            through a sigmoid when :obj:`learn` (``0`` and ``1`` stay fixed). (default: ``0.5``)
        compile (bool): Sinkhorn only (``solver="sinkhorn"``; BADMM and BADMM-Q run eager and
            refuse it). If :obj:`True`, Sinkhorn's iterations (and their adjoints in the lean
            backward) run as kernels compiled by :func:`torch.compile` with dynamic shapes, the layer
            itself staying eager; the first call compiles them (tens of seconds on a CPU), later calls
            of any batch size reuse them. On the benchmark's CPU it was slower than eager (see
            :func:`~uotp_geometric.functional.uot_plan` and ``docs/solvers.md``): leave it off there;
            :obj:`memory_efficient` ``=False`` stays eager. Prefer it to :func:`torch.compile` of the
            whole layer, which ``docs/bench`` measures slower than eager. (default: :obj:`False`)

    Examples:
        >>> import torch
        >>> from uotp_geometric import UOTAggregation
        >>> x = torch.randn(5, 8)
        >>> batch = torch.tensor([0, 0, 0, 1, 1])
        >>> pool = UOTAggregation(num_iters=4, eps=torch.tensor([1.0, 0.5, 0.5, 0.5]))
        >>> pool(x, batch).shape
        torch.Size([2, 8])
        >>> pool.value('eps')
        tensor([1.0000, 0.5000, 0.5000, 0.5000], grad_fn=<SoftplusBackward0>)
        >>> # As a message-passing aggregation, once uotp_geometric is imported:
        >>> from torch_geometric.nn import SAGEConv
        >>> conv = SAGEConv(8, 16, aggr='uot')

    References:
        - M. Cheng and H. Xu. `Revisiting global pooling through the lens of optimal transport
          <https://arxiv.org/abs/2201.09191>`__. arXiv:2201.09191, 2022. (UOT-Pooling)
        - H. Xu and M. Cheng. `Regularized optimal transport layers for generalized global pooling
          operations <https://arxiv.org/abs/2212.06339>`__. IEEE TPAMI, 2023. (ROT-Pooling)
        - L. Chizat, G. Peyré, B. Schmitzer and F.-X. Vialard. `Scaling algorithms for unbalanced
          optimal transport problems <https://arxiv.org/abs/1607.05816>`__. Mathematics of
          Computation, 2018. (``solver="sinkhorn"``)
        - H. Wang and A. Banerjee. `Bregman alternating direction method of multipliers
          <https://arxiv.org/abs/1306.3203>`__. NeurIPS 2014. (``solver="badmm"``)
    """
    def __init__(
        self,
        solver: str = 'sinkhorn',
        num_iters: int = 4,
        eps: Value = 1.0,
        lam_p: Value = INF,
        lam_q: Value = 1.0,
        rho: Value = 1.0,
        learn: bool = True,
        per_iteration: bool = False,
        prior: str = 'uniform',
        channels: Optional[int] = None,
        memory_efficient: bool = True,
        gw: Value = 0.0,
        prox: Value = 1.0,
        inner_iters: int = 4,
        mass_exponent: float = 0.5,
        compile: bool = False,
    ) -> None:
        super().__init__()
        values = dict(eps=eps, lam_p=lam_p, lam_q=lam_q)
        if solver != 'sinkhorn':
            values['rho'] = rho
        # gw = 0 adds nothing, so the layer and its state stay those of UOT-Pooling.
        if SolverOptions(gw=gw).has_structure():
            values['gw'] = gw
            if solver == 'sinkhorn':
                values['prox'] = prox
        SolverOptions(solver=solver, num_iters=num_iters, inner_iters=inner_iters,
                      memory_efficient=memory_efficient, compile=compile, **values).validate()
        if prior not in PRIORS:
            raise ValueError(f"Unknown prior '{prior}' (expected one of "
                             f"{list(PRIORS)})")
        if prior == 'attention' and channels is None:
            raise ValueError("prior='attention' needs 'channels', the input "
                             "feature size of its gate")
        self.solver = solver
        self.num_iters = num_iters
        self.learn = learn
        self.prior = prior
        self.channels = channels
        self.memory_efficient = memory_efficient
        self.compile = compile
        self.inner_iters = inner_iters
        self.init_values = {name: _initial(value) for name, value in values.items()}
        # A value given per iteration makes every value per iteration.
        self.per_iteration = per_iteration or any(
            isinstance(value, tuple) for value in self.init_values.values())
        for name, value in self.init_values.items():
            self._register_value(name, value)
        if prior == 'power':
            self._register_mass_exponent(float(mass_exponent))
        self.gate = Linear(channels, 1) if prior == 'attention' else None
        self.reset_parameters()

    def _register_mass_exponent(self, value: float) -> None:
        # One exponent for the whole layer: the prior is set once, before the iterations.
        if not 0 <= value <= 1:
            raise ValueError(f"'mass_exponent' must lie in [0, 1] (got {value})")
        self.init_values['mass_exponent'] = value
        if self.learn and 0 < value < 1:
            self.mass_exponent_raw = Parameter(torch.empty(1))
        else:
            self.register_buffer('mass_exponent_fixed', torch.full((1, ), value))

    def _register_value(self, name: str, value: InitialValue) -> None:
        size = self.num_iters if self.per_iteration else 1
        init = torch.as_tensor(value, dtype=torch.float64)
        # The softplus reaches neither 0 nor inf: a value with such an entry stays fixed.
        if self.learn and bool(((init > 0) & (init < INF)).all()):
            self.register_parameter(name + '_raw', Parameter(torch.empty(size)))
        else:
            fixed = init.to(torch.get_default_dtype()).expand(size).clone()
            self.register_buffer(name + '_fixed', fixed)

    def reset_parameters(self) -> None:
        for name, value in self.init_values.items():
            raw = getattr(self, name + '_raw', None)
            if raw is not None:
                init = torch.as_tensor(value, dtype=torch.float64)
                init = init.logit() if name == 'mass_exponent' else _inverse_softplus(init)
                with torch.no_grad():
                    raw.copy_(init.expand_as(raw))
        if self.gate is not None:
            self.gate.reset_parameters()

    def value(self, name: str) -> Tensor:
        r"""The current value of :obj:`name` (``"eps"``, ``"lam_p"``, ``"lam_q"``, ``"rho"``, ``"gw"``,
        ``"prox"`` or ``"mass_exponent"``, where the layer has it), of shape ``(num_iters,)`` if
        :obj:`per_iteration` (``(1,)`` for ``"mass_exponent"``), else ``(1,)``."""
        raw = getattr(self, name + '_raw', None)
        if raw is None:
            return getattr(self, name + '_fixed')
        return raw.sigmoid() if name == 'mass_exponent' else F.softplus(raw)

    @classmethod
    def from_preset(cls, name: str, solver: str = 'sinkhorn',
                    **overrides: Any) -> 'UOTAggregation':
        r"""A layer that computes the classic pooling :obj:`name`: ``"mean"``, ``"sum"``,
        ``"max"``, ``"softmax"`` (temperature ``t``, default 1) or ``"attention"`` (needs
        ``channels``). Its values are fixed unless ``learn=True`` is among :obj:`overrides`, in
        which case training starts from that pooling and may move away from it.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset '{name}' (expected one of "
                             f"{sorted(PRESETS)})")
        if solver not in SOLVERS:
            raise ValueError(f"Unknown solver '{solver}' (expected one of "
                             f"{list(SOLVERS)})")
        if solver not in PRESETS[name]:
            raise ValueError(f"The preset '{name}' has no setting for solver='{solver}' (it has "
                             f"{sorted(PRESETS[name])})")
        kwargs: Dict[str, Any] = dict(solver=solver, learn=False)
        kwargs.update(PRESETS[name][solver])
        if name == 'softmax':
            kwargs['eps'] = float(overrides.pop('t', 1.0))
        elif 't' in overrides:
            raise ValueError(f"'t' is a parameter of the softmax preset, not "
                             f"of '{name}'")
        kwargs.update(overrides)
        return cls(**kwargs)

    def priors(self, x: Tensor, index: Tensor,
               num_sets: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        r"""The priors the layer gives the sets of ``(x, index)`` (``x`` of shape ``(N, D)``): the
        dimension prior ``p``, shape ``(num_sets, D)``, and the log node prior ``log q``, shape ``(N,)``;
        ``None`` for the uniform default of :func:`~uotp_geometric.functional.uot_plan`."""
        segments = Segments(index, num_sets)
        if self.prior == 'attention':
            # The log-softmax of the gate over each set, in float32 even under autocast: log q stays
            # finite where q underflows.
            score = self.gate(x)
            if score.dtype in (torch.float16, torch.bfloat16):
                score = score.float()
            log_norm = segment_logsumexp(score, segments)
            return None, (score - segments.gather(log_norm)).squeeze(-1)
        if self.prior in ('counting', 'power'):
            # A plan of mass N^a: p = N^a / D per dimension, q = N^a / N per node (counting: a = 1).
            count = segment_count(segments, solve_dtype(x.dtype))
            mass = count
            if self.prior == 'power':
                mass = count.clamp_min(1).pow(self.value('mass_exponent').to(x.dtype))
            p = (mass / x.size(-1)).unsqueeze(-1).expand(-1, x.size(-1))
            return p, segments.gather(mass.log() - count.log())
        return None, None

    def forward(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
    ) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"'x' must be a floating-point tensor (got "
                            f"{x.dtype})")
        dim = dim % x.dim()
        if dim == x.dim() - 1:
            raise ValueError("UOTAggregation pools over a set axis and "
                             "transports into the last (feature) axis, so "
                             "'dim' cannot be the last axis")
        if index is None:
            assert ptr is not None  # Aggregation.__call__ sets one of them.
            index = torch.repeat_interleave(
                torch.arange(ptr.numel() - 1, device=ptr.device), ptr.diff(),
                output_size=x.size(dim))
        assert dim_size is not None  # Aggregation.__call__ infers it.
        if index.dim() != 1 or index.numel() != x.size(dim):
            raise ValueError(f"'index' must have shape ({x.size(dim)},), one "
                             f"entry per element along dim={dim} of 'x' (got "
                             f"shape {tuple(index.shape)})")

        # Every (set, extra-axis position) pair is an independent set of the flat layout.
        moved = x.movedim(dim, 0)
        num_nodes, extra_shape, num_dims = moved.size(0), moved.shape[1:-1], moved.size(-1)
        num_extra = math.prod(extra_shape)
        flat_x = moved.reshape(num_nodes * num_extra, num_dims)
        offsets = torch.arange(num_extra, device=index.device)
        flat_index = (index.unsqueeze(-1) * num_extra + offsets).reshape(-1)
        num_sets = dim_size * num_extra

        p, log_q = self.priors(flat_x, flat_index, num_sets)
        out = uot_pool(flat_x, flat_index, num_sets, p=p, log_q=log_q,
                       **self._solver_kwargs())
        return out.reshape(dim_size, *extra_shape, num_dims).movedim(0, dim)

    def plan(self, x: Tensor, index: Tensor,
             dim_size: Optional[int] = None) -> Tensor:
        r"""The transport plan :math:`T` the layer solves for on node features ``x`` of shape
        ``(N, D)`` grouped into sets by ``index``, with the layer's current values and priors: shape
        ``(N, D)``, one row per node (:func:`~uotp_geometric.functional.uot_plan`). The layer's output
        is :math:`D \sum_{n \in b} x_n \odot T_n` per set."""
        if x.dim() != 2:
            raise ValueError(f"'plan' takes node features of shape (num_nodes, num_features) "
                             f"(got shape {tuple(x.shape)})")
        dim_size = infer_num_sets(index, dim_size)
        p, log_q = self.priors(x, index, dim_size)
        return uot_plan(x, index, dim_size, p=p, log_q=log_q, **self._solver_kwargs())

    def _solver_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = dict(
            solver=self.solver, num_iters=self.num_iters, memory_efficient=self.memory_efficient,
            inner_iters=self.inner_iters, compile=self.compile)
        kwargs.update({name: self.value(name) for name in self.init_values
                       if name != 'mass_exponent'})
        return kwargs

    def __repr__(self) -> str:
        values = ', '.join(f'{name}={_format(self.value(name))}' for name in self.init_values)
        if 'prox' in self.init_values:
            values += f', inner_iters={self.inner_iters}'
        gate = f', channels={self.channels}' if self.gate is not None else ''
        compiled = ', compile=True' if self.compile else ''
        return (f'{self.__class__.__name__}(solver={self.solver}, '
                f'num_iters={self.num_iters}, {values}, learn={self.learn}, '
                f'per_iteration={self.per_iteration}, prior={self.prior}'
                f'{gate}{compiled})')
