r"""Probability density distillation (seed section 3.3.4; van den Oord et al., 2018): an IAF
student trained by reverse KL to match a fitted density model, for one-pass sampling.

A MAF teacher scores data in one pass but samples in D passes per layer; an IAF student
samples (and scores its own draws) in one pass per layer. The student is trained on its own
draws :math:`u = g(\varepsilon)`, :math:`\varepsilon \sim N(0, I)`, to minimize

.. math:: \mathrm{KL}(q \,\|\, p) = E_{\varepsilon}\bigl[\log q(u) - \log p(u)\bigr],
          \qquad \log q(u) = \log N(\varepsilon; 0, I) - \log\left|\det
          \frac{\partial g}{\partial \varepsilon}\right|,

where :math:`p` is the teacher's exact density (one MAF pass per draw). The student replaces
the teacher's flow and refiner; the teacher's fixed preconditioning :math:`P` stays:
student draws are :math:`x = P(u)`. KL divergence is invariant under the bijection :math:`P`
(its log-Jacobian enters :math:`\log q_x` and :math:`\log p_x` alike), so the objective taken in
the preconditioned space :math:`u` is exactly :math:`\mathrm{KL}(q_x \| p_x)` of the
densities of :math:`x`, preconditioning included; :func:`fidelity` estimates it in
:math:`x`-space to show it.

References:
    van den Oord et al., "Parallel WaveNet: Fast High-Fidelity Speech Synthesis", ICML 2018,
    https://arxiv.org/abs/1711.10433

Example (the parts :meth:`~pyroflows.density.DensityEstimator.distill` puts together):
    >>> import torch, pyroflows as pf
    >>> from pyroflows.density import distill as dd
    >>> x = torch.randn(400, 2) @ torch.tensor([[1.0, 0.5], [0.0, 0.5]])
    >>> est = pf.density.DensityEstimator(num_layers=2, hidden_dims=(16,), seed=0)
    >>> model = est.fit(x, max_epochs=2, progress=False)._model
    >>> student = dd.Student(2, num_layers=2, hidden_dims=(16,))
    >>> student = student.start_at(model.precondition(model.sample(torch.randn(1000, 2)))[0])
    >>> with dd.frozen(model):
    ...     record = dd.distill(student, dd.teacher_log_prob(model), max_steps=20)
    >>> record["best_val_kl"] <= record["initial_val_kl"]
    True
    >>> report = dd.fidelity(model, student, num_draws=500)
    >>> dd.sample(model, student, torch.randn(3, 2)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import flows
from .._checks import whole_number
from .._config import validation
from .._gaussian import ml_gaussian, standard_normal_log_prob
from .._random import generator as seeded
from ..transforms.affine import TriangularAffine
from .pipeline import ContextShift, DensityModel, evaluate
from .training import adam, snapshot

__all__ = ["Student", "check_options", "distill", "fidelity", "teacher_log_prob", "sample",
           "start", "frozen", "DISTILL_DEFAULTS"]

#: What :func:`distill` does unless told otherwise: at most ``max_steps`` Adam steps of
#: ``batch_size`` draws, the step size decayed from ``lr`` to zero by a cosine; the KL estimated
#: every ``eval_every`` steps on ``num_val_draws`` fixed draws (so the validated estimates of two
#: states differ by the states alone); the run stops early once the best validated estimate has
#: improved by less than ``tol`` nats per dimension over the last ``window`` steps.
DISTILL_DEFAULTS = {"max_steps": 4000, "lr": 4e-3, "batch_size": 512, "num_val_draws": 2048,
                    "eval_every": 50, "tol": 1e-3, "window": 1000}
# Gradients are clipped to this norm, as the teacher's training does.
MAX_GRAD_NORM = 1e3
# Teacher draws that place the student's base-side affine layer at start.
INIT_DRAWS = 4096

#: ``log_prob(u, context) -> log p(u)``: the teacher's density of preconditioned rows.
LogProb = Callable[[Tensor, Tensor | None], Tensor]


class Student(nn.Module):
    r"""The IAF student :math:`u = g(\varepsilon) = f_K \circ \dots \circ f_1(m + L
    \varepsilon)`: a learnable full-rank affine layer (:class:`~pyroflows.transforms.
    TriangularAffine`, started by :meth:`start_at` at the ML Gaussian of teacher draws), then
    ``num_layers`` :class:`~pyroflows.transforms.IAF` layers (each the identity at start, so the
    untrained student is that Gaussian) built by :func:`pyroflows.flows.build`, reverse
    permutations folded in. Sampling and scoring its own draws is one fused pass
    (:func:`~pyroflows._fast.affine.affine_chain`); scoring other points (:meth:`log_prob`) is
    the IAF's D-pass inverse.

    With ``context_dim = C`` the IAF layers are conditional (seed eq. 27: the context enters
    every MADE), a :class:`~pyroflows.density.pipeline.ContextShift` after the affine layer
    adds :math:`W h` (so the start is the linear-Gaussian :math:`N(m + W h, L L^\top)`), and
    every method takes ``context`` of shape (B, C) against draws (B, D).

    Arguments:
        dim: the event size D.
        num_layers: the number of IAF layers.
        hidden_dims: the MADE hidden widths.
        context_dim: the context size C, or ``None``.
        log_scale_bound: :math:`b` of the layers' :math:`\log\sigma = b\tanh(\cdot/b)`
            (default 2, the fitted MAF layers' default).

    Example:
        >>> import torch
        >>> s = Student(3, num_layers=2, hidden_dims=(16,))
        >>> u, log_q = s.rsample_and_log_prob(torch.randn(5, 3))
        >>> torch.allclose(s.log_prob(u), log_q, atol=1e-5)
        True
    """

    def __init__(self, dim: int, num_layers: int = 5, hidden_dims: Sequence[int] = (128, 128),
                 context_dim: int | None = None, log_scale_bound: float = 2.0) -> None:
        super().__init__()
        self.dim = int(dim)
        self.num_layers = whole_number(num_layers, "num_layers", 1)
        self.hidden_dims = tuple(whole_number(h, "each of hidden_dims", 1) for h in hidden_dims)
        self.context_dim = None if context_dim is None else int(context_dim)
        self.log_scale_bound = float(log_scale_bound)
        stack = flows.build("iaf", self.dim, num_layers=self.num_layers,
                            hidden_dims=self.hidden_dims, context_dim=self.context_dim,
                            log_scale_bound=self.log_scale_bound)
        if self.context_dim is None:
            self.flow = flows.FlowStack([TriangularAffine(self.dim), *stack.parts])
        else:  # the base N(m + W h, L L^T): a linear-Gaussian conditional at start
            self.flow = flows.ConditionalFlowStack(
                [TriangularAffine(self.dim), ContextShift(self.dim, self.context_dim),
                 *stack.sequence], dim=self.dim, context_dim=self.context_dim)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (what a file stores to rebuild the student)."""
        return {"dim": self.dim, "num_layers": self.num_layers,
                "hidden_dims": list(self.hidden_dims), "context_dim": self.context_dim,
                "log_scale_bound": self.log_scale_bound}

    def _affine(self) -> TriangularAffine:
        return self.flow.parts[0]

    @torch.no_grad()
    def start_at(self, u: Tensor, h: Tensor | None = None) -> Student:
        """Set the affine layer to the ML Gaussian of the rows ``u`` (N, D), or, for a
        conditional student, to the least-squares regression of ``u`` on their contexts ``h``
        (N, C), :math:`N(m + W h, L L^\top)` (``L``: the Cholesky factor of the residuals' ML
        covariance): the untrained student is then that Gaussian. Returns ``self``."""
        affine = self._affine()
        residual = u
        if self.context_dim is not None:
            if h is None:
                raise ValueError("a conditional student starts from rows and their contexts")
            h_mean = h.mean(0)
            weight = torch.linalg.lstsq(h - h_mean, u - u.mean(0)).solution.T  # (D, C)
            self.flow.parts[1].weight.copy_(weight.to(self.flow.parts[1].weight))
            residual = u - h @ weight.T
        loc, tril, _ = ml_gaussian(residual)
        affine.set_scale_tril_(tril)
        affine.loc.copy_(loc.to(affine.packed))
        return self

    def transform(self, context: Tensor | None = None) -> flows.FlowStack:
        """The map :math:`g` (for ``context``, where the student is conditional)."""
        if self.context_dim is None:
            if context is not None:
                raise ValueError("this student is not conditional: pass no context")
            return self.flow
        if context is None:
            raise ValueError("this student is conditional: pass context, shaped (B, "
                             f"{self.context_dim})")
        return self.flow.condition(context)

    def rsample_and_log_prob(self, eps: Tensor, context: Tensor | None = None
                             ) -> tuple[Tensor, Tensor]:
        r"""``(u, log q(u))`` with :math:`u = g(\varepsilon)` for base draws ``eps`` (..., D):
        one pass, differentiable (the reparameterization)."""
        u, log_det = self.transform(context).run(eps, validate=False)
        return u, standard_normal_log_prob(eps) - log_det

    def sample(self, eps: Tensor, context: Tensor | None = None) -> Tensor:
        r""":math:`u = g(\varepsilon)` for base draws ``eps`` (..., D): one pass."""
        return self.transform(context).run(eps, validate=False)[0]

    def log_prob(self, u: Tensor, context: Tensor | None = None) -> Tensor:
        r""":math:`\log q(u)` of any rows ``u`` (..., D): the IAF inverse (D passes)."""
        eps, log_det = self.transform(context).run(u, inverse=True, validate=False)
        return standard_normal_log_prob(eps) - log_det


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters without ``requires_grad`` for the duration (the teacher's, so a
    student's gradient computes no teacher gradient), then as they were."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def teacher_log_prob(model: DensityModel) -> LogProb:
    r"""The teacher's exact log density of preconditioned rows,
    :math:`\log p_u(u \mid h) = \log p_R(z) + \log|\det \partial z / \partial u|`,
    :math:`z = f_h^{-1}(u)` (the flow's one-pass inverse, then the refiner's); ``h``: the
    standardized contexts (``model.features(c)``), one row per row of ``u``, or ``None``."""

    def log_prob(u: Tensor, h: Tensor | None = None) -> Tensor:
        if (h is None) != (model.context_dim is None):
            raise ValueError("a conditional teacher needs contexts, an unconditional one none")
        z, log_det = model.latent(u) if h is None else model.latent(u, h)
        return model.base_log_prob(z) + log_det

    return log_prob


def _stage_forward(model: DensityModel, u: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, log|det dx/du|)`` with ``x = P(u)``, through the preconditioning stages."""
    log_det = torch.zeros(u.shape[:-1], device=u.device, dtype=u.dtype)
    for stage in model.stages:
        u, ld = stage.forward_and_log_det(u)
        log_det = log_det + ld
    return u, log_det


def sample(model: DensityModel, student: Student, eps: Tensor,
           context: Tensor | None = None) -> Tensor:
    r"""Draws of the data :math:`x = P(g_h(\varepsilon))` from base draws ``eps`` (N, D) (given
    raw contexts ``context`` (N, C), standardized by the teacher): the student's one fused
    pass, then the teacher's preconditioning stages."""
    u = student.sample(eps, model.features(context))
    for stage in model.stages:
        forward = getattr(stage, "forward_value", None)  # Tabak: its map without the log-det
        u = forward(u) if forward is not None else stage.forward_and_log_det(u)[0]
    return u


@torch.no_grad()
def start(model: DensityModel, student: Student, num_draws: int = INIT_DRAWS,
          contexts: Tensor | None = None, generator: torch.Generator | None = None) -> Student:
    """Start ``student`` at the ML Gaussian of ``num_draws`` teacher draws in the
    preconditioned space (under raw ``contexts`` drawn with replacement, where conditional);
    returns it."""
    param = next(student.parameters())
    if generator is None:
        generator = seeded(None, param.device)
    ctx = _contexts(contexts, int(num_draws), generator)
    with validation(False):
        x = evaluate(model.sample, _draws(int(num_draws), student.dim, param, generator), ctx)
        u = evaluate(model.precondition, x)[0]
    return student.start_at(u, model.features(ctx))


def _draws(n: int, dim: int, like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(n, dim, generator=generator, device=like.device, dtype=like.dtype)


def _contexts(contexts: Tensor | None, n: int, generator: torch.Generator) -> Tensor | None:
    """``n`` rows of ``contexts`` drawn with replacement (``None``: none)."""
    if contexts is None:
        return None
    idx = torch.randint(contexts.shape[0], (n,), generator=generator, device=generator.device)
    return contexts[idx.to(contexts.device)]


def check_options(max_steps: int, batch_size: int, lr: float, tol: float,
                  num_val_draws: int = 2, eval_every: int = 1, window: int = 1
                  ) -> tuple[int, int, int, int, int]:
    """:func:`distill`'s counts as ``int`` (``max_steps``, ``batch_size``, ``num_val_draws``,
    ``eval_every``, ``window``), after a ``ValueError`` for a count that is not a whole number
    of its least, an ``lr`` that is not finite and positive (inf: every step skipped) or a
    ``tol`` that is not finite and >= 0."""
    if not 0 < lr < math.inf or not 0 <= tol < math.inf:
        raise ValueError(f"need a finite lr > 0 and a finite tol >= 0; got lr={lr}, tol={tol}")
    return (whole_number(max_steps, "max_steps"), whole_number(batch_size, "batch_size", 1),
            whole_number(num_val_draws, "num_val_draws", 2),
            whole_number(eval_every, "eval_every", 1), whole_number(window, "window", 1))


def distill(student: Student, log_prob: LogProb, *,
            max_steps: int = DISTILL_DEFAULTS["max_steps"],
            batch_size: int = DISTILL_DEFAULTS["batch_size"], lr: float = DISTILL_DEFAULTS["lr"],
            contexts: Tensor | None = None,
            num_val_draws: int = DISTILL_DEFAULTS["num_val_draws"],
            eval_every: int = DISTILL_DEFAULTS["eval_every"],
            tol: float = DISTILL_DEFAULTS["tol"], window: int = DISTILL_DEFAULTS["window"],
            generator: torch.Generator | None = None, progress: bool = False) -> dict[str, Any]:
    r"""Train ``student`` by reverse KL against the density ``log_prob`` (the teacher's, whose
    parameters the caller holds :func:`frozen`); returns the record.

    Every step draws ``batch_size`` base points :math:`\varepsilon` (and, for a conditional
    student, as many rows of ``contexts``: the standardized contexts :math:`h` that student and
    teacher see, drawn with replacement), maps and scores them in the student's one pass,
    scores :math:`u` under the teacher and takes an Adam step on the mean of
    :math:`\log q(u) - \log p(u)` (an unbiased estimate of :math:`\mathrm{KL}(q\|p)`; the
    gradient by reparameterization), the step size decayed from ``lr`` to 0 by a cosine.
    A step with a non-finite loss or gradient is skipped. Every ``eval_every`` steps the KL is
    estimated on ``num_val_draws`` fixed draws, and the state with the lowest estimate (the
    start included) is kept; the student ends in it, also after an error or a
    ``KeyboardInterrupt`` (then with a warning and ``stopped = "interrupted"``).

    The convergence rule: at a validation at step :math:`s \ge` ``window``, the run stops
    (``stopped = "converged"``) when :math:`\mathrm{best}(s - w) - \mathrm{best}(s) <
    \mathrm{tol} \cdot D`, where :math:`\mathrm{best}(t)` is the lowest validated estimate at
    steps up to :math:`t` and :math:`w` the ``window`` rounded up to whole validation
    intervals: the last ``window`` steps gained less than ``tol`` nats per dimension.
    ``tol = 0`` turns the rule off (the best never rises). The default ``tol`` is
    :math:`10^{-3}` nats per dimension, a twentieth of issue 23's fidelity goal (0.02 nats per
    dimension), so a stopped run had little left to gain at its step size; the cosine decay
    still runs over ``max_steps``, so a run that stops early stops at a larger step size than
    it would have ended with.

    The record: ``step``, ``train_kl`` (the mean training estimate since the last
    validation), ``val_kl`` (lists, nats); ``best_step``, ``best_val_kl``, ``initial_val_kl``,
    ``skipped_steps``, ``stopped`` (``"max_steps"``, ``"converged"``, ``"interrupted"`` or
    ``"error"``), ``seconds`` and the settings.
    """
    max_steps, batch_size, num_val_draws, eval_every, window = check_options(
        max_steps, batch_size, lr, tol, num_val_draws, eval_every, window)
    if (contexts is None) != (student.context_dim is None):
        raise ValueError("a conditional student needs contexts (the training contexts), and "
                         "an unconditional one takes none")
    began = time.perf_counter()
    param = next(student.parameters())
    if generator is None:
        generator = seeded(None, param.device)
    val_eps = _draws(int(num_val_draws), student.dim, param, generator)
    val_context = _contexts(contexts, int(num_val_draws), generator)

    def gap(eps: Tensor, h: Tensor | None) -> Tensor:
        u, log_q = student.rsample_and_log_prob(eps, h)
        return log_q - log_prob(u, h)

    def val_kl() -> float:
        with torch.no_grad():
            return float(evaluate(gap, val_eps, val_context).mean())

    with validation(False):
        kl0 = val_kl()
    record: dict[str, Any] = {
        "step": [0], "train_kl": [float("nan")], "val_kl": [kl0], "best_step": 0,
        "best_val_kl": kl0, "initial_val_kl": kl0, "skipped_steps": 0, "stopped": "max_steps",
        "seconds": 0.0, "max_steps": max_steps, "batch_size": batch_size, "lr": float(lr),
        "num_val_draws": int(num_val_draws), "tol": float(tol), "window": int(window),
    }
    # validations back to the one ``window`` steps (rounded up to whole intervals) before
    lag = -(-int(window) // int(eval_every))
    best_so_far = [kl0]  # the lowest validated estimate up to each validation
    best = snapshot(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = adam(params, lr=float(lr))
    from tqdm.auto import tqdm

    bar = None
    try:
        bar = tqdm(range(1, max_steps + 1), disable=not progress, desc="distill", leave=False)
        total = torch.zeros((), device=param.device, dtype=param.dtype)
        count = 0
        student.train()
        for step in bar:
            for group in optimizer.param_groups:  # the cosine decay from lr to 0
                group["lr"] = float(lr) * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max_steps))
            eps = _draws(batch_size, student.dim, param, generator)
            ctx = _contexts(contexts, batch_size, generator)
            with validation(False):
                u, log_q = student.rsample_and_log_prob(eps, ctx)
                loss = (log_q - log_prob(u, ctx)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            # one host read per step: cheap next to the teacher's pass, and a skipped step must
            # not move Adam's moments
            if bool(torch.isfinite(loss) & torch.isfinite(norm)):
                optimizer.step()
                total += loss.detach()
                count += 1
            else:
                record["skipped_steps"] += 1
            if step % int(eval_every) == 0 or step == max_steps:
                with validation(False):
                    kl = val_kl()
                record["step"].append(step)
                record["train_kl"].append(float(total) / count if count else float("nan"))
                record["val_kl"].append(kl)
                total.zero_()
                count = 0
                if kl < record["best_val_kl"]:  # NaN is never better
                    record["best_step"], record["best_val_kl"] = step, kl
                    best = snapshot(student)
                best_so_far.append(record["best_val_kl"])
                bar.set_postfix(kl=f"{kl:.4f}", best=f"{record['best_val_kl']:.4f}")
                if (step % int(eval_every) == 0 and len(best_so_far) > lag
                        and best_so_far[-1 - lag] - best_so_far[-1] < float(tol) * student.dim):
                    record["stopped"] = "converged"
                    break
    except KeyboardInterrupt:
        record["stopped"] = "interrupted"
        warnings.warn("distillation interrupted: keeping the best student so far (step "
                      f"{record['best_step']}, KL estimate {record['best_val_kl']:.4f})",
                      stacklevel=3)
    except BaseException:
        record["stopped"] = "error"
        raise
    finally:
        if bar is not None:
            bar.close()
        student.eval()
        student.load_state_dict(best)
        record["seconds"] = time.perf_counter() - began
    return record


def _mean_se(values: Tensor) -> tuple[float, float]:
    n = values.numel()
    return float(values.mean()), float(values.std() / math.sqrt(n)) if n > 1 else float("nan")


@torch.no_grad()
def fidelity(model: DensityModel, student: Student, *, num_draws: int = 4096,
             x_val: Tensor | None = None, contexts: Tensor | None = None,
             context_val: Tensor | None = None,
             generator: torch.Generator | None = None) -> dict[str, Any]:
    r"""What fast sampling costs, in nats: the Monte-Carlo estimate of
    :math:`\mathrm{KL}(q_x\|p_x) = E_q[\log q_x(x) - \log p_x(x)]` on ``num_draws`` student
    draws :math:`x = P(u)`, scored in :math:`x`-space (the teacher's ``log_prob`` with its
    preconditioning; the student's :math:`\log q_x(x) = \log q(u) - \log|\det \partial P /
    \partial u|`), with its standard error, also per dimension; and the mean held-out
    log-likelihood of the student next to the teacher's on the rows ``x_val`` (the student's
    by its D-pass inverse), with the standard error of their paired difference. Without
    ``x_val`` the held-out rows are ``num_draws`` fresh teacher draws, and the teacher-minus-
    student gap is then an estimate of :math:`\mathrm{KL}(p_x\|q_x)`. For a conditional
    teacher, the draws' raw contexts are drawn with replacement from ``contexts`` (the KL is
    then the average over them), and ``context_val`` holds one raw context per row of
    ``x_val``.

    Returns a dict: ``kl``, ``kl_se``, ``kl_per_dim``, ``kl_per_dim_se``, ``num_draws``;
    ``heldout`` (``"x_val"`` or ``"teacher draws"``), ``heldout_rows``,
    ``teacher_log_prob``, ``student_log_prob`` (means), ``log_prob_gap`` (teacher minus
    student), ``log_prob_gap_se``.
    """
    num_draws = whole_number(num_draws, "num_draws", 2)
    if x_val is not None and x_val.shape[0] < 1:  # (the report's held-out means were NaN)
        raise ValueError("x_val has no rows: pass held-out rows, or x_val=None to score "
                         "teacher draws")
    if (contexts is None) != (model.context_dim is None):
        raise ValueError("a conditional teacher needs contexts, an unconditional one none")
    param = next(student.parameters())
    if generator is None:
        generator = seeded(None, param.device)
    dim = student.dim

    def gap(eps: Tensor, c: Tensor | None) -> Tensor:
        u, log_q = student.rsample_and_log_prob(eps, model.features(c))
        x, log_det = _stage_forward(model, u)
        return (log_q - log_det) - model.log_prob(x, c)

    def student_log_prob(x: Tensor, c: Tensor | None) -> Tensor:
        u, log_det = model.precondition(x)
        return student.log_prob(u, model.features(c)) + log_det

    with validation(False):
        ctx = _contexts(contexts, int(num_draws), generator)
        kl = evaluate(gap, _draws(int(num_draws), dim, param, generator), ctx)
        if x_val is None:
            heldout, context_val = "teacher draws", _contexts(contexts, int(num_draws), generator)
            x_val = evaluate(model.sample, _draws(int(num_draws), dim, param, generator),
                             context_val)
        else:
            heldout = "x_val"
            if (context_val is None) != (contexts is None):
                raise ValueError("x_val of a conditional teacher needs context_val, one raw "
                                 "context per row")
        lp_teacher = evaluate(model.log_prob, x_val, context_val)
        lp_student = evaluate(student_log_prob, x_val, context_val)
    kl_mean, kl_se = _mean_se(kl)
    gap_mean, gap_se = _mean_se(lp_teacher - lp_student)
    return {
        "kl": kl_mean, "kl_se": kl_se, "kl_per_dim": kl_mean / dim, "kl_per_dim_se": kl_se / dim,
        "num_draws": int(num_draws), "heldout": heldout, "heldout_rows": int(x_val.shape[0]),
        "teacher_log_prob": float(lp_teacher.mean()),
        "student_log_prob": float(lp_student.mean()),
        "log_prob_gap": gap_mean, "log_prob_gap_se": gap_se,
    }
