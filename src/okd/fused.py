"""Fused linear distillation: the loss of a KD (or OKD) step from hidden states, logits never whole.

The dense path computes ``student_logits = lm_head(h_s)`` and ``teacher_logits = lm_head_t(h_t)`` for
the whole batch (two ``[N, V]`` tensors, 1.5 GiB each in fp32 for 8 x 1024 tokens and V = 49,152) and
then the divergence. Here the output heads are part of the loss: the counted tokens are processed
``chunk_tokens`` at a time, and for each chunk we

1. compute that chunk's logits from the hidden states and head weights (``[c, V]``, float32),
2. compute the chunk's loss terms with the library's own divergences (:mod:`okd.divergences`, looked
   up by name) and ``F.cross_entropy``, and their gradient w.r.t. the chunk's logits with
   ``torch.autograd.grad``,
3. turn it into gradients of the *inputs* right away: ``grad_h[chunk] = g @ W``, ``grad_W += g.T @ h``,
   ``grad_b += g.sum(0)`` (``W``'s gradient accumulates in one buffer of ``W``'s shape),
4. drop the chunk's logits.

backward only scales the buffers by the incoming gradient. This is the design of Liger-Kernel's fused
linear JSD (chunk over tokens, gradient in the forward pass), written here in plain torch for every
divergence of the library. Peak extra memory: the gradient buffers (``[V, d]`` for ``W_s``, ``[N, d]``
for the hidden states) plus about a dozen ``[c, V]`` float32 temporaries of one chunk;
``benchmarks/fused_memory.py`` measures it.

Conventions (the same as the dense path, ``okd.training.DistillationLoss`` over ``okd.divergences``)
----------------------------------------------------------------------------------------------------
* **Student loss**: ``(1 - kd_ratio) * CE(student, targets) + kd_ratio * D(teacher.detach(), student)``.
  With ``kd_ratio = 1`` the CE is still computed (for logging) but carries no gradient.
* **Module loss (OKD)**, when ``module_ce_weight`` and ``module_student_weight`` are given:
  ``module_ce_weight * CE(teacher, targets) + module_student_weight * D'(student.detach(), teacher)``:
  the student is the target distribution; ``D'`` is the same divergence with roles swapped, or the
  module's own (``module_divergence``, e.g. generalized JSD). Its gradient
  flows into the teacher's hidden states only (the online adapter sits before the frozen head).
* **Temperature** ``T`` divides both logits inside ``D`` only; there is **no** ``T**2`` factor (as in
  ``okd.divergences``), and CE always uses the unscaled logits.
* **Vocabulary padding** (``okd.divergences.align_vocab``): a teacher head with more rows than the
  student's (``V_t > V_s``) is cut to its first ``V_s`` rows for ``D`` in both directions; a smaller
  teacher head raises ``ValueError``. The teacher's CE (module loss) uses all ``V_t`` logits, as the
  dense ``cross_entropy(teacher_logits, targets)`` does. (The dense module direction itself refuses
  ``V_t > V_s``; the fused one equals ``D(student.detach(), align_vocab(teacher, V_s))``.)
* **Counted tokens**: a position counts when ``mask`` is True there (all when ``mask`` is None) and,
  if ``targets`` are given, ``targets != ignore_index`` there. Every reported value is the mean over
  the counted tokens; positions that do not count get no logits, no compute and zero gradient. With no
  counted token every value is a float32 zero connected to the graph, and ``backward`` gives zero
  gradients (never NaN), like the dense path.
* **Once-only backward**: as in ``okd.divergences``, the gradient buffers are scaled in place and handed
  to autograd, so backward runs once per call (backward ``loss + module_loss`` together, as the loop
  does) and double backward is not supported.

Public API: :func:`fused_linear_distillation`, :class:`FusedLinearDistillationLoss`, :class:`FusedLosses`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from okd.divergences import get_divergence
from okd.targets import IGNORE_INDEX, mix_losses

__all__ = ["FusedLinearDistillationLoss", "FusedLosses", "budget_chunk_tokens", "fused_linear_distillation"]

# 16 tokens keep one chunk's ~dozen [c, V] float32 temporaries near 0.05x of one [8192, V] logits tensor,
# so that loss + gradients stay under 0.15x (benchmarks/fused_memory.py); larger chunks are faster on CPU
# (the head weight is read fewer times) and cost memory in proportion.
DEFAULT_CHUNK_TOKENS = 16


def budget_chunk_tokens(hidden_size: int, budget: float = 0.15, reference_tokens: int = 8192) -> int:
    """The largest chunk that keeps loss + gradients within ``budget`` x one fp32 ``[reference_tokens, V]``
    logits tensor. In units of one ``[V]`` float32 row the budget is ``budget * reference_tokens``; the
    fixed part (the ``W_s`` gradient ``[V, d]``, the hidden-state gradients, allocator slack) takes about
    ``4/3 * hidden_size`` rows and each chunk token about 20, 21 with a margin (its ``[c, V]`` float32 temporaries and their
    gradients): both fitted to ``benchmarks/fused_memory.py`` at V = 49,152, d = 576 (chunk 16: 0.134x,
    chunk 27: 0.161x). At least 16 tokens; larger chunks read the head weights fewer times (faster) and
    cost memory in proportion. ``budget_chunk_tokens(576)`` = 21 (predicted 0.146x)."""
    return max(16, int((budget * reference_tokens - 4 * hidden_size / 3) // 21))


@dataclass
class FusedLosses:
    """What one fused call returns (the field names of ``okd.training.StepLosses``).

    ``loss`` (the student's objective) and ``module_loss`` (OKD only) are float32 scalars with a graph:
    backward their sum once. The other fields are detached float32 scalars for logging (the means of
    the individual terms); ``kd`` is None when no divergence was taken, the ``module_*`` fields are
    None when no module loss was asked for, ``ce`` is None without targets.
    """

    loss: Tensor
    ce: Optional[Tensor] = None
    kd: Optional[Tensor] = None
    module_loss: Optional[Tensor] = None
    module_ce: Optional[Tensor] = None
    module_divergence: Optional[Tensor] = None
    module_accuracy: Optional[Tensor] = None  # top-1 accuracy of the (adapted) teacher on the targets
    module_kl_from_frozen: Optional[Tensor] = None  # KL(p_0 || p_phi) when teacher_frozen_hidden was given

    def as_floats(self) -> dict[str, float]:
        return {
            f.name: float(getattr(self, f.name).detach())
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }


@dataclass
class _Plan:
    """Everything the autograd Function needs besides the differentiable tensors."""

    rows: Optional[Tensor]  # [M] indices of counted tokens, or None for all N
    n_counted: int
    targets: Optional[Tensor]  # [M] targets of the counted tokens (already selected), or None
    divergence: Optional[Callable[..., Tensor]]  # bound: temperature, reduction="sum", chunk_tokens
    module_divergence: Optional[Callable[..., Tensor]]  # the module's D(student -> teacher), bound likewise
    kd_ratio: float
    use_kd: bool
    module: bool
    module_ce_weight: float
    module_student_weight: float
    chunk_tokens: int
    teacher_rows: int  # rows of the teacher head to compute: V_s, or V_t when the teacher's CE needs all
    need_h_s: bool
    need_w_s: bool
    need_b_s: bool
    need_h_t: bool
    frozen_hidden: Optional[Tensor] = None  # [N, d_t] the frozen teacher's hidden states (diagnostic KL only)
    kl_sum: Optional[Callable[..., Tensor]] = None  # forward KL at temperature 1, reduction "sum"


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``[c, d] x [V, d] (+ [V]) -> [c, V]`` float32 (computed in the head's dtype, as a model would)."""
    return F.linear(hidden.to(weight.dtype), weight, bias).float()


def _ce_sum(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="sum")


class _FusedLinearDistillation(torch.autograd.Function):
    """forward(h_s [N, d_s], W_s [V_s, d_s], b_s [V_s] | None, h_t [N, d_t] | None, W_t [V_t, d_t] | None,
    b_t [V_t] | None, plan) -> (loss, module_loss, stats [6] = (ce, kd, module_ce, module_div, module
    accuracy, module KL from frozen) means).

    The gradients of ``loss`` w.r.t. h_s, W_s, b_s and of ``module_loss`` w.r.t. h_t are computed
    chunk by chunk inside forward and stored in buffers; backward scales them.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, plan: _Plan):
        device = h_s.device
        m = plan.n_counted
        inv_m = 1.0 / m if m > 0 else 0.0
        # W's gradient accumulates over chunks: in float32 when the head is half precision.
        acc_dtype = torch.float32 if w_s.dtype in (torch.float16, torch.bfloat16) else w_s.dtype
        grad_h_s = torch.zeros(h_s.shape, dtype=torch.float32, device=device) if plan.need_h_s else None
        grad_w_s = torch.zeros(w_s.shape, dtype=acc_dtype, device=device) if plan.need_w_s else None
        grad_b_s = torch.zeros(b_s.shape, dtype=torch.float32, device=device) if plan.need_b_s else None
        grad_h_t = torch.zeros(h_t.shape, dtype=torch.float32, device=device) if plan.need_h_t else None
        need_student_grad = plan.need_h_s or plan.need_w_s or plan.need_b_s
        w_t_used = b_t_used = None
        if h_t is not None:
            w_t_used = w_t[: plan.teacher_rows]  # the padding cut: a view, no copy
            b_t_used = None if b_t is None else b_t[: plan.teacher_rows]
        v_s = w_s.shape[0]
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # ce, kd, module_ce, module_div, accuracy, kl_frozen

        for start in range(0, m, plan.chunk_tokens):
            stop = min(start + plan.chunk_tokens, m)
            if plan.rows is None:
                hs = h_s[start:stop]
                ht = None if h_t is None else h_t[start:stop]
            else:
                idx = plan.rows[start:stop]
                hs = h_s.index_select(0, idx)
                ht = None if h_t is None else h_t.index_select(0, idx)
            y = None if plan.targets is None else plan.targets[start:stop]
            with torch.no_grad():
                s = _logits(hs.detach(), w_s.detach(), None if b_s is None else b_s.detach())
                t = None if ht is None else _logits(ht.detach(), w_t_used.detach(), None if b_t_used is None else b_t_used.detach())

            # ---- the student's loss: (1 - r) CE(s) + r D(t -> s) ----
            r = plan.kd_ratio
            ce_needs_grad = need_student_grad and r < 1
            kd_needs_grad = need_student_grad and plan.use_kd
            with torch.enable_grad():
                s_leaf = s.requires_grad_(True) if (ce_needs_grad or kd_needs_grad) else s
                objective = None
                if y is not None:
                    with torch.set_grad_enabled(ce_needs_grad):
                        ce = _ce_sum(s_leaf, y)
                    sums[0] += ce.detach().double()
                    if ce_needs_grad:
                        objective = (1.0 - r) * inv_m * ce
                if plan.use_kd:
                    with torch.set_grad_enabled(kd_needs_grad):
                        kd = plan.divergence(t, s_leaf)
                    sums[1] += kd.detach().double()
                    if kd_needs_grad:
                        term = r * inv_m * kd
                        objective = term if objective is None else objective + term
                g_s = torch.autograd.grad(objective, s_leaf)[0] if objective is not None else None
            del objective
            if g_s is not None:
                g = g_s.to(w_s.dtype)
                if plan.need_h_s:
                    part = g @ w_s.detach()
                    if plan.rows is None:
                        grad_h_s[start:stop] = part
                    else:
                        grad_h_s.index_copy_(0, idx, part.float())
                if plan.need_w_s:
                    grad_w_s.addmm_(g.t().to(acc_dtype), hs.detach().to(acc_dtype))
                if plan.need_b_s:
                    grad_b_s += g_s.sum(0)
                del g, g_s

            # ---- the module's loss (OKD): cw CE(t) + sw D(s.detach() -> t), gradient into h_t ----
            if plan.module:
                s_target = s.detach()
                with torch.enable_grad():
                    t_leaf = t.requires_grad_(True) if plan.need_h_t else t
                    mce = _ce_sum(t_leaf, y) if y is not None else None
                    mdiv = plan.module_divergence(s_target, t_leaf[:, :v_s])
                    if mce is not None:
                        sums[2] += mce.detach().double()
                    sums[3] += mdiv.detach().double()
                    if y is not None:
                        sums[4] += (t.detach().argmax(-1) == y).sum().double()
                    if plan.frozen_hidden is not None:  # diagnostic KL(p_0 || p_phi), no graph
                        with torch.no_grad():
                            fh = plan.frozen_hidden[start:stop] if plan.rows is None else plan.frozen_hidden.index_select(0, idx)
                            f = _logits(fh, w_t_used, b_t_used)
                            sums[5] += plan.kl_sum(f, t.detach()).double()
                            del f
                    g_t = None
                    if plan.need_h_t:
                        objective = plan.module_student_weight * inv_m * mdiv
                        if mce is not None and plan.module_ce_weight != 0:
                            objective = objective + plan.module_ce_weight * inv_m * mce
                        if objective.requires_grad:
                            g_t = torch.autograd.grad(objective, t_leaf)[0]
                        del objective
                if g_t is not None:
                    part = g_t.to(w_t_used.dtype) @ w_t_used.detach()
                    if plan.rows is None:
                        grad_h_t[start:stop] = part
                    else:
                        grad_h_t.index_copy_(0, idx, part.float())
                    del g_t
            del s, t  # free the chunk's logits before the next chunk

        means = (sums * inv_m).float()
        ce_mean, kd_mean, mce_mean, mdiv_mean, _, _ = means.unbind()
        # kd_mean is 0 without the divergence (kd_ratio 0), ce_mean 0 without targets (kd_ratio 1).
        loss = mix_losses(ce_mean, kd_mean, plan.kd_ratio)
        module_loss = plan.module_student_weight * mdiv_mean + plan.module_ce_weight * mce_mean
        ctx.buffers = [grad_h_s, grad_w_s, grad_b_s, grad_h_t]
        ctx.dtypes = [h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype, None if h_t is None else h_t.dtype]
        ctx.mark_non_differentiable(means)
        return loss.clone(), module_loss.clone(), means

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_module_loss, _grad_stats):
        buffers = ctx.buffers
        if buffers is None:
            raise RuntimeError(
                "okd.fused: backward through a fused loss can run only once (its gradient buffers are scaled "
                "in place); backward loss + module_loss together, or recompute the loss"
            )
        ctx.buffers = None
        scales = [grad_loss, grad_loss, grad_loss, grad_module_loss]
        out = []
        for buffer, scale, dtype in zip(buffers, scales, ctx.dtypes):
            if buffer is not None:
                if scale is None:
                    buffer.zero_()
                elif not (scale.item() == 1.0):
                    buffer.mul_(scale)
                buffer = buffer.to(dtype)  # no copy when the dtype already matches
            out.append(buffer)
        return out[0], out[1], out[2], out[3], None, None, None


def _check_real(name: str, value, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return float(value)


def fused_linear_distillation(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    targets: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    teacher_frozen_hidden: Optional[Tensor] = None,
    divergence: str = "forward_kl",
    divergence_params: Optional[dict] = None,
    kd_ratio: float = 1.0,
    temperature: float = 1.0,
    module_ce_weight: Optional[float] = None,
    module_student_weight: Optional[float] = None,
    module_divergence: Optional[str] = None,
    module_divergence_params: Optional[dict] = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
) -> FusedLosses:
    """The student's KD loss (and, for OKD, the module's loss) from final hidden states and head weights.

    Args:
        student_hidden: ``[..., d_s]`` the student's final hidden states (after its final norm), e.g.
            ``[B, T, d_s]`` or the loss positions gathered as ``[N, d_s]``.
        student_weight: ``[V_s, d_s]`` the student's output-head weight
            (``model.get_output_embeddings().weight``; may be tied to the input embedding).
        teacher_hidden: ``[..., d_t]`` the teacher's final hidden states (after the online adapter for
            OKD), same leading shape; None for plain fine-tuning (``kd_ratio = 0``, no module loss).
        teacher_weight: ``[V_t, d_t]`` with ``V_t >= V_s`` (a wider, padded head is cut; see the module
            docstring). Treated as frozen.
        targets: ``[...]`` int64 next-token ids (``ignore_index`` where there is none), or None (then no
            CE: ``kd_ratio`` must be 1 and ``module_ce_weight`` 0).
        mask: ``[...]`` bool or 0/1, True = the token counts; None = all count.
        student_bias, teacher_bias: ``[V_s]`` / ``[V_t]`` head biases, or None.
        teacher_frozen_hidden: ``[..., d_t]`` the frozen teacher's hidden states (before the OKD
            adapter), or None: with a module loss, reports ``module_kl_from_frozen`` = KL(p_0 || p_phi)
            at temperature 1 (a diagnostic without gradient; one more teacher-head matmul per chunk).
        divergence, divergence_params: a name of ``okd.divergences.DIVERGENCES`` and its parameters
            (``{"beta": 0.5, "scaled": False}`` for ``"jsd"``, ``{"alpha": ...}``, ``{"mu": ...}``).
        kd_ratio: in ``[0, 1]``; the student's loss is ``(1 - kd_ratio) CE + kd_ratio D``.
        temperature: ``> 0``; divides the logits inside D only; no ``T**2`` factor.
        module_ce_weight, module_student_weight: give both for the OKD module loss
            ``module_ce_weight CE(teacher) + module_student_weight D(student.detach() -> teacher)``,
            whose gradient flows into ``teacher_hidden``.
        module_divergence, module_divergence_params: the module's ``D`` (a name of
            ``okd.divergences.DIVERGENCES`` and its parameters, at the same temperature); None = the
            student's ``divergence`` and ``divergence_params`` (OKD's ``online.divergence=same``).
        chunk_tokens: counted tokens per chunk; peak memory grows with ``chunk_tokens * V``. The result
            does not depend on it beyond float32 rounding.
        ignore_index: the target value that marks a position without a target.

    Returns:
        :class:`FusedLosses` (means over the counted tokens).
    """
    # ---- validation: one line naming the culprit ----
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__}")
    if student_weight.dim() != 2 or student_hidden.dim() < 1 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden [..., d] and student_weight [V, d] must share d, got {tuple(student_hidden.shape)} "
            f"and {tuple(student_weight.shape)}"
        )
    v_s, d_s = student_weight.shape
    lead = student_hidden.shape[:-1]
    if student_bias is not None and tuple(student_bias.shape) != (v_s,):
        raise ValueError(f"student_bias must have shape ({v_s},), got {tuple(student_bias.shape)}")
    kd_ratio = _check_real("kd_ratio", kd_ratio, 0.0, 1.0)
    temperature = _check_real("temperature", temperature, 0.0, math.inf, low_open=True)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    module = module_ce_weight is not None or module_student_weight is not None
    if module and (module_ce_weight is None or module_student_weight is None):
        raise ValueError("give both module_ce_weight and module_student_weight for the module loss, or neither")
    mcw = _check_real("module_ce_weight", module_ce_weight) if module else 0.0
    msw = _check_real("module_student_weight", module_student_weight) if module else 0.0
    use_kd = kd_ratio > 0
    if not (use_kd or module):  # plain fine-tuning: the teacher's logits are not needed
        teacher_hidden = teacher_weight = teacher_bias = None
    if teacher_hidden is None:
        if use_kd or module:
            raise ValueError("teacher_hidden and teacher_weight are needed for kd_ratio > 0 or a module loss")
        teacher_weight = teacher_bias = None
    else:
        if teacher_weight is None or teacher_weight.dim() != 2:
            raise ValueError("teacher_weight [V_t, d_t] must be given with teacher_hidden")
        if teacher_hidden.shape[:-1] != lead or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(
                f"teacher_hidden must be [{', '.join(map(str, lead))}, d_t] with d_t = teacher_weight.shape[1], got "
                f"{tuple(teacher_hidden.shape)} and teacher_weight {tuple(teacher_weight.shape)}"
            )
        v_t = teacher_weight.shape[0]
        if v_t < v_s:
            raise ValueError(
                f"teacher vocab {v_t} < student vocab {v_s}: the teacher's head must cover every student token id "
                "(a larger, padded teacher head is cut; a smaller one cannot be)"
            )
        if teacher_bias is not None and tuple(teacher_bias.shape) != (v_t,):
            raise ValueError(f"teacher_bias must have shape ({v_t},), got {tuple(teacher_bias.shape)}")
    if targets is None and (kd_ratio < 1 or mcw != 0):
        raise ValueError("targets are needed for the CE terms (kd_ratio < 1 or module_ce_weight != 0)")
    divergence_fn = None
    if use_kd or module:
        # Validates the name and the parameters (one line listing the valid ones) before any compute.
        divergence_fn = get_divergence(
            divergence, **(divergence_params or {}), temperature=temperature, reduction="sum", chunk_tokens=chunk_tokens
        )
    module_divergence_fn = divergence_fn
    if module and module_divergence is not None:
        module_divergence_fn = get_divergence(
            module_divergence, **(module_divergence_params or {}), temperature=temperature, reduction="sum",
            chunk_tokens=chunk_tokens,
        )
    elif module_divergence_params:
        raise ValueError("module_divergence_params given without module_divergence")

    # ---- counted tokens ----
    n = math.prod(lead)
    h_s = student_hidden.reshape(n, d_s)
    h_t = None if teacher_hidden is None else teacher_hidden.reshape(n, teacher_hidden.shape[-1])
    counted = None
    if mask is not None:
        if tuple(mask.shape) != tuple(lead):
            raise ValueError(f"mask must have the hidden states' leading shape {tuple(lead)}, got {tuple(mask.shape)}")
        flat = mask.reshape(-1).to(h_s.device)
        if flat.dtype != torch.bool:
            if not bool(((flat == 0) | (flat == 1)).all()):
                raise ValueError("mask must be bool or contain only 0 and 1")
            flat = flat != 0
        counted = flat
    flat_targets = None
    if targets is not None:
        if tuple(targets.shape) != tuple(lead) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"targets must be int64 with the hidden states' leading shape {tuple(lead)}, got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )
        flat_targets = targets.reshape(-1).to(h_s.device).long()
        valid = flat_targets != ignore_index
        counted = valid if counted is None else counted & valid
    rows = None
    if counted is not None and not bool(counted.all()):
        rows = counted.nonzero().squeeze(1)
    n_counted = n if rows is None else rows.numel()
    if flat_targets is not None and rows is not None:
        flat_targets = flat_targets.index_select(0, rows)

    grad = torch.is_grad_enabled()
    need_h_t = grad and module and h_t.requires_grad
    if grad and module and (
        teacher_weight.requires_grad or (teacher_bias is not None and teacher_bias.requires_grad)
    ):
        raise ValueError(
            "teacher_weight requires grad, but the fused path keeps the teacher head frozen (OKD trains the module "
            "before it): call teacher_weight.requires_grad_(False)"
        )
    plan = _Plan(
        rows=rows,
        n_counted=n_counted,
        targets=flat_targets,
        divergence=divergence_fn,
        module_divergence=module_divergence_fn if module else None,
        kd_ratio=kd_ratio,
        use_kd=use_kd,
        module=module,
        module_ce_weight=mcw,
        module_student_weight=msw,
        chunk_tokens=chunk_tokens,
        # The teacher's CE needs all of its logits; the divergence only the first V_s.
        teacher_rows=(teacher_weight.shape[0] if (module and mcw != 0) else v_s) if teacher_weight is not None else 0,
        need_h_s=grad and h_s.requires_grad,
        need_w_s=grad and student_weight.requires_grad,
        need_b_s=grad and student_bias is not None and student_bias.requires_grad,
        need_h_t=need_h_t,
        frozen_hidden=None if (teacher_frozen_hidden is None or not module) else teacher_frozen_hidden.reshape(n, -1).detach(),
        kl_sum=get_divergence("forward_kl", reduction="sum", chunk_tokens=chunk_tokens) if module else None,
    )
    loss, module_loss, means = _FusedLinearDistillation.apply(
        h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, plan
    )
    ce, kd, module_ce, module_div, module_accuracy, module_kl = means.unbind()
    return FusedLosses(
        loss=loss,
        ce=ce if targets is not None else None,
        kd=kd if use_kd else None,
        module_loss=module_loss if module else None,
        module_ce=module_ce if module and targets is not None else None,
        module_divergence=module_div if module else None,
        module_accuracy=module_accuracy if module and targets is not None else None,
        module_kl_from_frozen=module_kl if module and teacher_frozen_hidden is not None else None,
    )


class FusedLinearDistillationLoss:
    """The fused loss with its settings bound, to be called once per step from a training loop.

    Args:
        divergence, divergence_params, kd_ratio, temperature, chunk_tokens, ignore_index: as in
            :func:`fused_linear_distillation`.
        module_ce_weight, module_student_weight: the OKD module loss weights (None: no module loss).
        module_divergence, module_divergence_params: the module's own divergence (None: ``divergence``).

    ``from_method(method, online, chunk_tokens)`` builds it from ``okd.config``'s ``ResolvedMethod`` and
    ``OnlineModuleConfig`` (the objects ``okd.training.DistillationLoss`` takes).

    Call: ``loss_fn(h_s, W_s, h_t, W_t, targets, mask, student_bias=..., teacher_bias=...,
    update_module=False)`` -> :class:`FusedLosses`; the module loss is computed only when
    ``update_module`` is True and module weights are set.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        divergence_params: Optional[dict] = None,
        kd_ratio: float = 1.0,
        temperature: float = 1.0,
        module_ce_weight: Optional[float] = None,
        module_student_weight: Optional[float] = None,
        module_divergence: Optional[str] = None,
        module_divergence_params: Optional[dict] = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.divergence = divergence
        self.divergence_params = dict(divergence_params or {})
        self.kd_ratio = kd_ratio
        self.temperature = temperature
        self.module_ce_weight = module_ce_weight
        self.module_student_weight = module_student_weight
        self.module_divergence = module_divergence
        self.module_divergence_params = dict(module_divergence_params or {})
        self.chunk_tokens = chunk_tokens
        self.ignore_index = ignore_index
        get_divergence(divergence, **self.divergence_params)  # fail at construction on a bad name/parameter
        if module_divergence is not None:
            get_divergence(module_divergence, **self.module_divergence_params)

    @classmethod
    def from_method(cls, method, online=None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> "FusedLinearDistillationLoss":
        """From ``okd.config.ResolvedMethod`` (+ ``OnlineModuleConfig`` for OKD; its ``divergence``
        ``same`` is the method's divergence and parameters)."""
        own = online is not None and online.divergence != "same"
        return cls(
            divergence=method.divergence,
            divergence_params=method.divergence_params,
            kd_ratio=method.kd_ratio,
            temperature=method.temperature,
            module_ce_weight=None if online is None else online.ce_weight,
            module_student_weight=None if online is None else online.student_weight,
            module_divergence=online.divergence if own else None,
            module_divergence_params=online.divergence_params if own else None,
            chunk_tokens=chunk_tokens,
        )

    def __call__(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Optional[Tensor],
        teacher_weight: Optional[Tensor],
        targets: Optional[Tensor],
        mask: Optional[Tensor] = None,
        *,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
        teacher_frozen_hidden: Optional[Tensor] = None,
        update_module: bool = False,
    ) -> FusedLosses:
        module = update_module and self.module_ce_weight is not None
        return fused_linear_distillation(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            targets,
            mask,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            teacher_frozen_hidden=teacher_frozen_hidden,
            divergence=self.divergence,
            divergence_params=self.divergence_params,
            kd_ratio=self.kd_ratio,
            temperature=self.temperature,
            module_ce_weight=self.module_ce_weight if module else None,
            module_student_weight=self.module_student_weight if module else None,
            module_divergence=self.module_divergence if module else None,
            module_divergence_params=self.module_divergence_params if module and self.module_divergence else None,
            chunk_tokens=self.chunk_tokens,
            ignore_index=self.ignore_index,
        )
