"""Which features of a teacher distribution does each divergence transfer to a too-small student?

A controlled experiment with no language model: the teacher's next-token distributions are built by
hand with a known shape, a student of limited capacity is fitted to them with each divergence of
``okd.divergences`` (and with OKD's adaptive teacher), and the fitted student is compared with the
*original* teacher feature by feature: first mode, second mode, entropy, tail.

Teacher (exact construction)
    ``C`` contexts (stand-ins for the prefixes ``y_<t, x`` of a sequence) over a vocabulary of ``V``
    tokens. For each context ``c`` a random permutation ``pi_c`` of the ``V`` tokens is drawn (torch
    generator seeded with the run seed); then

        p_c(pi_c[0]) = mode1                                   (first mode, default 0.40)
        p_c(pi_c[1]) = mode2                                   (second mode, default 0.25)
        p_c(pi_c[k]) = (1 - mode1 - mode2) * k'^-s / H   for k = 2 .. V-1, k' = k - 1,
                       H = sum_{j=1}^{V-2} j^-s            (Zipf tail, s = --zipf, default 1.0)

    so every context has the same sorted profile (for V = 64: 0.40, 0.25, then a tail of 0.35 whose
    largest token has 0.074 and smallest 0.0012) but a different, random assignment of tokens to it.
    The teacher's logits are ``log p``. Since the ``C`` assignments are unrelated, the ``C x V`` matrix of
    teacher log-probabilities has (generically) full rank ``min(C, V)``.

Student (capacity-limited)
    ``logits_c = A_c @ B + b`` with ``A: [C, r]``, ``B: [r, V]``, ``b: [V]``: a rank-``r`` factorisation
    of the logit matrix plus a shared bias (the "embedding x output head" of a tiny LM whose hidden size
    is ``r``). For ``r`` well below ``min(C, V)`` (every ``r`` swept here) it cannot represent the
    teacher exactly; ``r`` is swept (default 1, 2, 4, 8, 16) to show the effect of student size.
    Init: ``A ~ N(0, 0.3^2)``, ``B ~ N(0, 0.3^2 / r)``, ``b = 0`` (a near-uniform student).

Fitting
    Full batch (all ``C`` contexts every step), exact expectations (no sampling), Adam (peak lr
    ``--lr``, 5% linear warm-up, cosine decay to 0), ``--steps`` steps. The loss is the library's
    divergence, called as training does (``get_divergence(name, **preset params)(teacher, student)``)
    with the parameters of okd's method presets (``okd.config.METHOD_PRESETS``): FKL (kd), RKL (rkl),
    JSD (jsd, beta 0.5), TVD (tvd), SKL (skl, alpha 0.1), SRKL (srkl, alpha 0.1), AKL (akl, mu 0.5).
    All ranks and seeds of one method are fitted together in one batched tensor ``[R, S, C, V]``: the
    divergence is taken with ``reduction="none"``, averaged over contexts per run and summed over
    runs, so each run receives exactly the gradient of its own mean loss, and Adam (elementwise) keeps
    the runs independent. Convergence check (``--convergence-check``, on by default in the full run):
    everything is refitted from the same initialisation with ``--check-steps`` steps (default half of
    ``--steps``, which keeps the full run within about 3 minutes of one CPU core), and the largest
    change between the two step counts of the final loss and of every metric is reported per method.

OKD's adaptive target (how it maps onto ``okd.training``/``okd.teacher``)
    The teacher becomes ``t_phi = head(ResidualAdapter(h))``: ``okd.teacher.ResidualAdapter``
    (``h + up(gelu(down(h)))``, ``up`` zero-initialised, bottleneck ``--bottleneck``) applied to the
    teacher's "final hidden state" ``h``, followed by a frozen "output head". There is no network
    here, so ``h`` is the teacher's logit vector standardised per context,
    ``h_c = (log p_c - mean_v log p_c) / std_v log p_c`` (unit-scale features, as a final LayerNorm
    leaves a real LM's hidden state), and the head undoes that standardisation exactly
    (``head(x) = x * std + mean``). Ablation ``OKD-raw``: ``h = log p_c`` itself with an identity head
    (every coordinate carries the same large negative offset, about -5.6 for V = 64 against a
    spread of about 1.2, which changes how easily the module can move; both are reported).
    At step 0 ``t_phi`` is the original teacher exactly. Every step (``update_every = 1``), as in
    ``Distiller.training_step`` and ``DistillationLoss``:

        student loss = D(t_phi.detach() -> student)          D = forward KL (the okd preset)
        module loss  = ce_weight * CE(t_phi, data) + student_weight * D(student.detach() -> t_phi)
        one backward of (student loss + module loss), then one step of each optimizer.

    ``CE(t_phi, data)`` is the exact expectation over the true teacher distribution,
    ``-sum_v p_c(v) log t_phi,c(v)``, instead of the cross-entropy on sampled tokens that training
    uses. ``ce_weight``, ``student_weight`` come from ``OnlineModuleConfig()`` (1.0 and 1.0). The
    module's optimizer is Adam at a constant lr equal to the student's peak lr times
    ``OnlineModuleConfig().learning_rate / TrainConfig().learning_rate`` (5e-4 / 5e-4 = 1), as in
    training, where the student follows a schedule and the module does not. Weight decay and gradient
    clipping are off for every method here (we want the divergence's own optimum).
    All metrics are measured against the original teacher, not the adapted one; the adapted teacher's
    own features are reported separately (``okd_teacher``).

Metrics (per run averaged over contexts, then mean and sample std over seeds)
    mode1_recovered  student argmax == teacher's first mode
    mode2_recovered  student's 2nd-ranked token == teacher's second mode
    mode1_prob       q(first mode)                    (teacher: mode1)
    mode2_prob       q(second mode)                   (teacher: mode2)
    mode2_ratio      q(second mode) / p(second mode)  (teacher: 1)
    entropy          H(q) in nats                     (teacher: H(p), identical for every context)
    tail_mass        1 - q(first mode) - q(second mode), the mass outside the teacher's top 2
    fkl, rkl, tvd    KL(p||q), KL(q||p), TV(p, q) to the original teacher (okd.divergences)
    final_loss       the training loss at the last step (OKD: the student's loss against t_phi)

Usage
    python benchmarks/divergence_geometry.py            # full run (~3 min of one CPU core)
    python benchmarks/divergence_geometry.py --quick    # tiny smoke test, a few seconds

Writes ``docs/results/divergence_geometry.json`` (atomically), ``docs/results/divergence_geometry.png``,
and the table section of ``docs/results/divergence_geometry.md`` (between the markers
``<!-- table:start -->`` and ``<!-- table:end -->``; the file is created if missing). ``--quick`` writes
``divergence_geometry_quick.{json,png}`` and leaves the markdown alone unless ``--markdown`` is given.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from okd.config import METHOD_PRESETS, OnlineModuleConfig, TrainConfig
from okd.divergences import forward_kl, get_divergence, reverse_kl, total_variation
from okd.evaluation import write_json_atomic
from okd.teacher import ResidualAdapter

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DEFAULT_OUT = RESULTS / "divergence_geometry.json"
DEFAULT_FIGURE = RESULTS / "divergence_geometry.png"
DEFAULT_MARKDOWN = RESULTS / "divergence_geometry.md"
QUICK_OUT = RESULTS / "divergence_geometry_quick.json"
QUICK_FIGURE = RESULTS / "divergence_geometry_quick.png"
TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"

# Display name -> okd method preset whose divergence (and parameters) it uses. OKD-raw is an ablation
# of OKD's module input (see the module docstring).
METHODS = {
    "FKL": "kd",
    "RKL": "rkl",
    "JSD": "jsd",
    "TVD": "tvd",
    "SKL": "skl",
    "SRKL": "srkl",
    "AKL": "akl",
    "OKD": "okd",
    "OKD-raw": "okd",
}
OKD_HIDDEN = {"OKD": "standardized", "OKD-raw": "raw"}
METRICS = (
    "mode1_recovered",
    "mode2_recovered",
    "mode1_prob",
    "mode2_prob",
    "mode2_ratio",
    "entropy",
    "tail_mass",
    "fkl",
    "rkl",
    "tvd",
)
INIT_STD = 0.3


# --------------------------------------------------------------------------------------------------
# Teacher and student
# --------------------------------------------------------------------------------------------------


def teacher_profile(vocab: int, mode1: float, mode2: float, zipf: float) -> torch.Tensor:
    """The sorted probabilities shared by every context: ``[mode1, mode2, Zipf tail...]``, shape ``[V]``."""
    if vocab < 3:
        raise ValueError("vocab must be >= 3")
    if not (0 < mode2 < mode1 and mode1 + mode2 < 1):
        raise ValueError("need 0 < mode2 < mode1 and mode1 + mode2 < 1")
    ranks = torch.arange(1, vocab - 1, dtype=torch.float64)
    tail = ranks.pow(-zipf)
    tail = (1.0 - mode1 - mode2) * tail / tail.sum()
    if tail[0] >= mode2:
        raise ValueError("the largest tail token must stay below the second mode (raise --zipf)")
    return torch.cat([torch.tensor([mode1, mode2], dtype=torch.float64), tail])


def make_teacher(contexts: int, vocab: int, mode1: float, mode2: float, zipf: float, seed: int):
    """Teacher probabilities ``[C, V]`` (float32) and the token ids of the two modes, ``[C]`` each."""
    profile = teacher_profile(vocab, mode1, mode2, zipf)
    gen = torch.Generator().manual_seed(10_000 + seed)
    perms = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(contexts)])  # [C, V]
    probs = torch.zeros(contexts, vocab, dtype=torch.float64)
    probs.scatter_(1, perms, profile.expand(contexts, vocab))
    return probs.float(), perms[:, 0].clone(), perms[:, 1].clone()


def init_students(ranks, seeds, contexts: int, vocab: int):
    """Per rank: ``(A [S, C, r], B [S, r, V], b [S, V])`` as leaf parameters, seeded per (rank, seed)."""
    params = []
    for r in ranks:
        a_list, b_list = [], []
        for seed in seeds:
            gen = torch.Generator().manual_seed(1_000 * seed + r)
            a_list.append(torch.randn(contexts, r, generator=gen) * INIT_STD)
            b_list.append(torch.randn(r, vocab, generator=gen) * INIT_STD / math.sqrt(r))
        a = torch.nn.Parameter(torch.stack(a_list))
        b = torch.nn.Parameter(torch.stack(b_list))
        bias = torch.nn.Parameter(torch.zeros(len(seeds), vocab))
        params.append((a, b, bias))
    return params


def student_logits(params) -> torch.Tensor:
    """``[R, S, C, V]`` logits of every (rank, seed) student."""
    return torch.stack([torch.bmm(a, b) + bias[:, None, :] for a, b, bias in params])


def _schedule(optimizer, steps: int):
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _per_run(values: torch.Tensor) -> torch.Tensor:
    """Per-token values ``[R, S, C]`` -> per-run mean over contexts ``[R, S]``."""
    return values.mean(dim=-1)


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


def fit_fixed(divergence, teacher_logits, ranks, seeds, steps: int, lr: float):
    """Fit every (rank, seed) student to the fixed teacher. Returns (logits, per-run final loss, trace)."""
    S, C, V = teacher_logits.shape
    params = init_students(ranks, seeds, C, V)
    flat = [p for group in params for p in group]
    optimizer = torch.optim.Adam(flat, lr=lr)
    scheduler = _schedule(optimizer, steps)
    target = teacher_logits.expand(len(ranks), S, C, V)
    trace = []
    for step in range(steps):
        logits = student_logits(params)
        per_run = _per_run(divergence(target, logits, reduction="none"))
        optimizer.zero_grad(set_to_none=True)
        per_run.sum().backward()
        optimizer.step()
        scheduler.step()
        if step % max(1, steps // 20) == 0:
            trace.append((step, per_run.detach().clone()))
    with torch.no_grad():
        logits = student_logits(params)
        final = _per_run(divergence(target, logits, reduction="none"))
    trace.append((steps, final.clone()))
    return logits, final, trace


def fit_okd(divergence, teacher_logits, teacher_probs, ranks, seeds, steps: int, lr: float, bottleneck: int,
            hidden_kind: str = "standardized"):
    """OKD: students and one online module per (rank, seed), trained jointly (see the module docstring).

    Returns (student logits, per-run final student loss, trace, adapted teacher logits, module info).
    """
    S, C, V = teacher_logits.shape
    online = OnlineModuleConfig()
    module_lr = lr * online.learning_rate / TrainConfig().learning_rate
    params = init_students(ranks, seeds, C, V)
    flat = [p for group in params for p in group]
    # One okd.teacher.ResidualAdapter per (rank, seed), each seeded and initialised by its own
    # constructor, then run together with torch.func (stacked parameters + vmap): the same function
    # as calling each adapter in a loop, a few times faster for these tiny shapes.
    adapters = []
    for r in ranks:
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(2_000 * seed + r)
                adapters.append(ResidualAdapter(V, bottleneck))
    stacked, _ = torch.func.stack_module_state(adapters)
    module_params = {name: torch.nn.Parameter(value) for name, value in stacked.items()}
    skeleton = ResidualAdapter(V, bottleneck).to("meta")
    optimizer = torch.optim.Adam(flat, lr=lr)
    scheduler = _schedule(optimizer, steps)
    module_optimizer = torch.optim.Adam(list(module_params.values()), lr=module_lr)
    R = len(ranks)
    # The teacher's "final hidden state" is its logit vector standardised per context (as a final
    # LayerNorm would leave it); the frozen "output head" undoes the standardisation exactly.
    shift = teacher_logits.mean(-1, keepdim=True)
    scale = teacher_logits.std(-1, keepdim=True)
    if hidden_kind == "raw":  # ablation: the raw log-probabilities as the hidden state, identity head
        shift, scale = torch.zeros_like(shift), torch.ones_like(scale)
    elif hidden_kind != "standardized":
        raise ValueError(f"unknown OKD hidden kind {hidden_kind!r}")
    hidden = ((teacher_logits - shift) / scale).expand(R, S, C, V).reshape(R * S, C, V)  # run i = (i // S, i % S)

    def one_adapter(params, h):
        return torch.func.functional_call(skeleton, (params,), (h,))

    def adapted_teacher() -> torch.Tensor:
        return torch.vmap(one_adapter)(module_params, hidden).reshape(R, S, C, V) * scale + shift

    trace = []
    for step in range(steps):
        t_phi = adapted_teacher()  # with the module's graph
        logits = student_logits(params)
        student_loss = _per_run(divergence(t_phi.detach(), logits, reduction="none"))
        module_ce = _per_run(-(teacher_probs * F.log_softmax(t_phi, dim=-1)).sum(-1))
        module_div = _per_run(divergence(logits.detach(), t_phi, reduction="none"))
        module_loss = online.ce_weight * module_ce + online.student_weight * module_div
        optimizer.zero_grad(set_to_none=True)
        module_optimizer.zero_grad(set_to_none=True)
        (student_loss.sum() + module_loss.sum()).backward()
        optimizer.step()
        scheduler.step()
        module_optimizer.step()
        if step % max(1, steps // 20) == 0:
            trace.append((step, student_loss.detach().clone()))
    with torch.no_grad():
        t_phi = adapted_teacher()
        logits = student_logits(params)
        final = _per_run(divergence(t_phi, logits, reduction="none"))
        module_ce = _per_run(-(teacher_probs * F.log_softmax(t_phi, dim=-1)).sum(-1))
        module_div = _per_run(divergence(logits, t_phi, reduction="none"))
    trace.append((steps, final.clone()))
    info = {
        "hidden": hidden_kind,
        "module_lr": module_lr,
        "ce_weight": online.ce_weight,
        "student_weight": online.student_weight,
        "final_module_ce": module_ce,
        "final_module_divergence": module_div,
    }
    return logits, final, trace, t_phi, info


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def feature_metrics(logits: torch.Tensor, teacher_logits, teacher_probs, m1, m2) -> dict[str, torch.Tensor]:
    """Every metric of ``METRICS`` per run, ``[R, S]``, against the original teacher."""
    R = logits.shape[0]
    q = logits.softmax(-1)
    log_q = logits.log_softmax(-1)
    top2 = q.topk(2, dim=-1).indices  # [R, S, C, 2]
    m1e, m2e = m1.expand(R, *m1.shape), m2.expand(R, *m2.shape)
    q1 = q.gather(-1, m1e[..., None]).squeeze(-1)
    q2 = q.gather(-1, m2e[..., None]).squeeze(-1)
    p2 = teacher_probs.gather(-1, m2[..., None]).squeeze(-1)
    target = teacher_logits.expand_as(logits)
    out = {
        "mode1_recovered": (top2[..., 0] == m1e).float(),
        "mode2_recovered": (top2[..., 1] == m2e).float(),
        "mode1_prob": q1,
        "mode2_prob": q2,
        "mode2_ratio": q2 / p2,
        "entropy": -(q * log_q).sum(-1),
        "tail_mass": 1.0 - q1 - q2,
        "fkl": forward_kl(target, logits, reduction="none"),
        "rkl": reverse_kl(target, logits, reduction="none"),
        "tvd": total_variation(target, logits, reduction="none"),
    }
    return {k: _per_run(v) for k, v in out.items()}


def summarise(per_run: torch.Tensor) -> dict:
    """``[S]`` per-seed values -> mean, sample std, and the values."""
    values = [float(v) for v in per_run]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": values}


def teacher_reference(teacher_probs, teacher_logits, m1, m2) -> dict[str, float]:
    """The teacher's own value of each feature (what a perfect student would score)."""
    metrics = feature_metrics(teacher_logits[None], teacher_logits, teacher_probs, m1, m2)
    return {k: float(v.mean()) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------------
# Experiment
# --------------------------------------------------------------------------------------------------


def run_all(args, steps: int, log=print) -> dict:
    """Fit every method at every rank and seed with ``steps`` steps; return results and raw logits."""
    seeds, ranks = args.seeds, args.ranks
    teachers = [make_teacher(args.contexts, args.vocab, args.mode1, args.mode2, args.zipf, s) for s in seeds]
    teacher_probs = torch.stack([t[0] for t in teachers])  # [S, C, V]
    m1 = torch.stack([t[1] for t in teachers])
    m2 = torch.stack([t[2] for t in teachers])
    teacher_logits = teacher_probs.log()
    out = {"teacher": teacher_reference(teacher_probs, teacher_logits, m1, m2), "methods": {}, "logits": {},
           "adapted_teacher_logits": {}, "teacher_probs": teacher_probs, "m1": m1, "m2": m2}
    for name in args.methods:
        preset = METHOD_PRESETS[METHODS[name]]
        divergence = get_divergence(preset["divergence"], **preset["divergence_params"])
        start = time.perf_counter()
        extra = {}
        if preset["online_teacher"]:
            logits, final, trace, t_phi, info = fit_okd(
                divergence, teacher_logits, teacher_probs, ranks, seeds, steps, args.lr, args.bottleneck,
                OKD_HIDDEN[name],
            )
            out["adapted_teacher_logits"][name] = t_phi
            adapted = feature_metrics(t_phi, teacher_logits, teacher_probs, m1, m2)
            extra = {
                "okd_teacher": {
                    str(r): {
                        **{k: summarise(v[i]) for k, v in adapted.items()},
                        "module_ce": summarise(info["final_module_ce"][i]),
                        "module_divergence": summarise(info["final_module_divergence"][i]),
                    }
                    for i, r in enumerate(ranks)
                },
                "okd_settings": {k: v for k, v in info.items() if not isinstance(v, torch.Tensor)},
            }
        else:
            logits, final, trace = fit_fixed(divergence, teacher_logits, ranks, seeds, steps, args.lr)
        seconds = time.perf_counter() - start
        metrics = feature_metrics(logits, teacher_logits, teacher_probs, m1, m2)
        per_rank = {}
        for i, r in enumerate(ranks):
            row = {k: summarise(v[i]) for k, v in metrics.items()}
            row["final_loss"] = summarise(final[i])
            row["loss_trace"] = [[step, float(loss[i].mean())] for step, loss in trace]
            per_rank[str(r)] = row
        out["methods"][name] = {
            "preset": METHODS[name],
            "divergence": preset["divergence"],
            "divergence_params": preset["divergence_params"],
            "online_teacher": preset["online_teacher"],
            "fit_seconds": seconds,
            "ranks": per_rank,
            **extra,
        }
        out["logits"][name] = logits
        log(f"  {name:5s} {steps} steps  {seconds:6.1f} s  final loss by rank: "
            + ", ".join(f"r={r}: {per_rank[str(r)]['final_loss']['mean']:.4f}" for r in ranks))
    return out


def convergence_report(main: dict, check: dict, ranks) -> dict:
    """Change of every seed-mean metric between the main fit and the check fit, per method and rank."""
    keys = ("final_loss",) + METRICS
    per_rank = {
        name: {
            str(r): {
                key: abs(result["ranks"][str(r)][key]["mean"] - check["methods"][name]["ranks"][str(r)][key]["mean"])
                for key in keys
            }
            for r in ranks
        }
        for name, result in main["methods"].items()
    }
    per_method = {name: {key: max(rows[str(r)][key] for r in ranks) for key in keys} for name, rows in per_rank.items()}
    overall = {key: max(per_method[n][key] for n in per_method) for key in keys}
    return {"abs_change": per_rank, "max_abs_change_per_method": per_method, "max_abs_change_overall": overall}


def example_context(results: dict, ranks_to_show, context: int = 0) -> dict:
    """Teacher vs each student on one context of seed 0, tokens sorted by teacher probability."""
    p = results["teacher_probs"][0, context]
    order = torch.argsort(p, descending=True)
    example = {"seed_index": 0, "context": context, "teacher": [float(v) for v in p[order]], "students": {},
               "adapted_teachers": {}}
    rank_list = list(results["methods"][next(iter(results["methods"]))]["ranks"])
    for r in ranks_to_show:
        i = rank_list.index(str(r))
        example["students"][str(r)] = {
            name: [float(v) for v in logits[i, 0, context].softmax(-1)[order]]
            for name, logits in results["logits"].items()
        }
        example["adapted_teachers"][str(r)] = {
            name: [float(v) for v in logits[i, 0, context].softmax(-1)[order]]
            for name, logits in results["adapted_teacher_logits"].items()
        }
    return example


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def markdown_table(payload: dict, rank: int) -> str:
    teacher = payload["teacher"]
    cols = [
        ("1st mode ok", "mode1_recovered", 2),
        ("2nd mode ok", "mode2_recovered", 2),
        ("q(1st)", "mode1_prob", 3),
        ("q(2nd)/p(2nd)", "mode2_ratio", 2),
        ("entropy", "entropy", 2),
        ("tail mass", "tail_mass", 3),
        ("KL(p||q)", "fkl", 3),
        ("KL(q||p)", "rkl", 3),
        ("TV", "tvd", 3),
        ("final loss", "final_loss", 4),
    ]
    lines = [
        f"Rank r = {rank}; mean ± std over {len(payload['settings']['seeds'])} seeds (each value is the mean "
        f"over {payload['settings']['contexts']} contexts); every column is measured against the original teacher.",
        "",
        "| method | " + " | ".join(c[0] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| teacher | " + " | ".join(
            "—" if key == "final_loss" else f"{teacher[key]:.{d}f}" for _, key, d in cols
        ) + " |",
    ]
    for name, result in payload["results"].items():
        row = result["ranks"][str(rank)]
        cells = [f"{row[key]['mean']:.{d}f} ± {row[key]['std']:.{d}f}" for _, key, d in cols]
        params = "".join(f", {k} {v}" for k, v in result["divergence_params"].items())
        if result["online_teacher"]:
            params += f", online module, {result['okd_settings']['hidden']} h"
        label = f"{name} ({result['divergence']}{params})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, table: str, command: str) -> None:
    section = f"{TABLE_START}\n{table}\n{TABLE_END}"
    if path.exists():
        text = path.read_text()
        if TABLE_START in text and TABLE_END in text:
            head, rest = text.split(TABLE_START, 1)
            _, tail = rest.split(TABLE_END, 1)
            new = head + section + tail
        else:
            new = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        new = f"# Divergence geometry\n\nCommand: `{command}`\n\n{section}\n"
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(new)
    os.replace(tmp, path)


def make_figure(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = payload["settings"]["ranks"]
    teacher = payload["teacher"]
    panels = [
        ("mode1_recovered", "first mode recovered (argmax)"),
        ("mode2_recovered", "second mode recovered (2nd-ranked)"),
        ("mode1_prob", "q(first mode)"),
        ("mode2_ratio", "q(second mode) / p(second mode)"),
        ("entropy", "entropy (nats)"),
        ("tail_mass", "tail mass (outside teacher's top 2)"),
        ("fkl", "KL(p || q) to teacher"),
        ("rkl", "KL(q || p) to teacher"),
    ]
    names = list(payload["results"])
    examples = payload["example"]["students"]
    example_rank = str(payload["settings"]["table_rank"])
    n_cols_bottom = 5
    n_rows_bottom = math.ceil(len(names) / n_cols_bottom)
    fig = plt.figure(figsize=(19, 9.5 + 2.6 * n_rows_bottom))
    outer = fig.add_gridspec(2, 1, height_ratios=[2, 0.95 * n_rows_bottom], hspace=0.22)
    grid = outer[0].subgridspec(2, 4, hspace=0.42, wspace=0.28)
    colors = plt.get_cmap("tab10")
    palette = {"OKD": colors(9), "OKD-raw": colors(8)}
    styles = {n: dict(color=palette.get(n, colors(i % 7)), marker="os^vD<>Px"[i % 9],
                      ls="--" if n == "OKD-raw" else "-")
              for i, n in enumerate(names)}
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(grid[k // 4, k % 4])
        for name in names:
            rows = payload["results"][name]["ranks"]
            mean = [rows[str(r)][key]["mean"] for r in ranks]
            std = [rows[str(r)][key]["std"] for r in ranks]
            lw = 2.6 if name == "OKD" else 1.4
            ax.errorbar(ranks, mean, yerr=std, label=name, lw=lw, ms=4, capsize=2, **styles[name])
        if key in ("fkl", "rkl"):  # the teacher's value is 0: no reference line on a log axis
            ax.set_yscale("log")
            title += "  (teacher: 0)"
        else:
            ax.axhline(teacher[key], color="black", ls="--", lw=1.2, label="teacher")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks)
        ax.set_xticklabels([str(r) for r in ranks])
        ax.set_xlabel("student rank r (capacity)")
        ax.set_title(title, fontsize=10)
        if k == 0:
            ax.legend(fontsize=8, ncol=2)
    # One context, teacher vs each student at the table rank: one small panel per method.
    example = payload["example"]
    bottom = outer[1].subgridspec(n_rows_bottom, n_cols_bottom, hspace=0.5, wspace=0.12)
    x = list(range(len(example["teacher"])))
    bar_colors = ["dimgray", "darkgray"] + ["lightgray"] * (len(x) - 2)
    for j, name in enumerate(names):
        ax = fig.add_subplot(bottom[j // n_cols_bottom, j % n_cols_bottom])
        ax.bar(x, example["teacher"], color=bar_colors, width=1.0, label="teacher")
        adapted = payload["example"]["adapted_teachers"][example_rank].get(name)
        if adapted is not None:
            ax.plot(x, adapted, color="black", lw=0.9, ls=":", label="adapted teacher")
        ax.plot(x, examples[example_rank][name], lw=0.9, ms=2.5, label=f"{name} student", **styles[name])
        if adapted is not None:
            ax.legend(fontsize=7, loc="lower left")
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 1.0)
        ax.set_title(f"{name}, r = {example_rank}", fontsize=10)
        if j % n_cols_bottom:
            ax.set_yticklabels([])
        else:
            ax.set_ylabel("probability")
        if j // n_cols_bottom == n_rows_bottom - 1 or j + n_cols_bottom >= len(names):
            ax.set_xlabel("token, sorted by teacher prob.")
    s = payload["settings"]
    fig.suptitle(
        f"Which teacher features each divergence transfers to a rank-r student  (C={s['contexts']} contexts, "
        f"V={s['vocab']}, teacher: modes {s['mode1']}/{s['mode2']} + Zipf({s['zipf']}) tail; {len(s['seeds'])} seeds, "
        f"mean ± std; dashed: teacher)\nbottom: one context (seed {s['seeds'][0]}, context "
        f"{payload['example']['context']}), teacher (bars; dark: first and second mode) vs each method's "
        "student (line); OKD panels: adapted teacher dotted",
        fontsize=12,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (a few seconds)")
    parser.add_argument("--contexts", type=int, default=None, help="number of contexts C (default 64; quick 16)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size V (default 64; quick 16)")
    parser.add_argument("--mode1", type=float, default=0.4, help="teacher probability of the first mode")
    parser.add_argument("--mode2", type=float, default=0.25, help="teacher probability of the second mode")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the tail")
    parser.add_argument("--ranks", type=_int_list, default=None, help="student ranks (default 1,2,4,8,16; quick 1,2,4)")
    parser.add_argument("--seeds", type=_int_list, default=None, help="seeds (default 0,1,2; quick 0,1)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (default 2000; quick 200)")
    parser.add_argument("--lr", type=float, default=0.05, help="student peak learning rate (Adam)")
    parser.add_argument("--bottleneck", type=int, default=None, help="OKD adapter bottleneck (default 16; quick 4)")
    parser.add_argument("--methods", type=lambda t: t.split(","), default=list(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--convergence-check", action=argparse.BooleanOptionalAction, default=None,
                        help="refit with --check-steps steps and report the change (default: on; off with --quick)")
    parser.add_argument("--check-steps", type=int, default=None, help="steps of the convergence check (default steps // 2)")
    parser.add_argument("--table-rank", type=int, default=None, help="rank of the markdown table (default: middle rank)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--figure", type=Path, default=None, help=f"figure (default {DEFAULT_FIGURE.relative_to(ROOT)})")
    parser.add_argument("--markdown", type=Path, default=None,
                        help=f"markdown whose table section is (re)written (default {DEFAULT_MARKDOWN.relative_to(ROOT)}; "
                             "--quick: none unless given)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(contexts=(16, 64), vocab=(16, 64), ranks=([1, 2, 4], [1, 2, 4, 8, 16]), seeds=([0, 1], [0, 1, 2]),
                    steps=(200, 2000), bottleneck=(4, 16), convergence_check=(False, True),
                    out=(QUICK_OUT, DEFAULT_OUT), figure=(QUICK_FIGURE, DEFAULT_FIGURE))
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if args.markdown is None and not quick:
        args.markdown = DEFAULT_MARKDOWN
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    if args.check_steps is None:
        args.check_steps = max(1, args.steps // 2)
    if args.table_rank is None:
        args.table_rank = args.ranks[len(args.ranks) // 2]
    if args.table_rank not in args.ranks:
        parser.error("--table-rank must be one of --ranks")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    given = [str(a) for a in (argv if argv is not None else sys.argv[1:])]
    command = shlex.join(["python", "benchmarks/divergence_geometry.py", *given])
    start = time.perf_counter()
    print(f"divergence geometry: C={args.contexts} V={args.vocab} ranks={args.ranks} seeds={args.seeds} steps={args.steps}")
    results = run_all(args, args.steps)
    convergence = None
    if args.convergence_check:
        print(f"convergence check: refit with {args.check_steps} steps")
        check = run_all(args, args.check_steps)
        convergence = {"steps": args.steps, "check_steps": args.check_steps,
                       **convergence_report(results, check, args.ranks)}
    low = next((r for r in args.ranks if r > 1), args.ranks[0])
    example_ranks = list(dict.fromkeys([low, args.table_rank]))
    payload = {
        "benchmark": "divergence_geometry",
        "command": command,
        "settings": {
            "contexts": args.contexts, "vocab": args.vocab, "mode1": args.mode1, "mode2": args.mode2, "zipf": args.zipf,
            "ranks": args.ranks, "seeds": args.seeds, "steps": args.steps, "lr": args.lr,
            "schedule": "Adam, 5% linear warm-up, cosine decay to 0; no weight decay, no clipping",
            "init": f"A ~ N(0, {INIT_STD}^2), B ~ N(0, {INIT_STD}^2 / r), bias 0",
            "okd_bottleneck": args.bottleneck, "quick": args.quick, "threads": args.threads,
            "table_rank": args.table_rank, "check_steps": args.check_steps if args.convergence_check else None,
            "teacher_profile": [float(v) for v in teacher_profile(args.vocab, args.mode1, args.mode2, args.zipf)],
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "teacher": results["teacher"],
        "results": results["methods"],
        "convergence": convergence,
        "example": example_context(results, example_ranks),
    }
    payload["seconds"] = time.perf_counter() - start
    write_json_atomic(args.out, payload)
    make_figure(payload, args.figure)
    table = markdown_table(payload, args.table_rank)
    if args.markdown is not None:
        write_markdown(args.markdown, table, command)
    print(table)
    if convergence is not None:
        overall = {k: round(v, 4) for k, v in convergence["max_abs_change_overall"].items()}
        print(f"largest change between {args.check_steps} and {args.steps} steps:", overall)
    print(f"wrote {args.out}, {args.figure}" + (f", {args.markdown}" if args.markdown else "") + f" in {payload['seconds']:.1f} s")
    return payload


if __name__ == "__main__":
    main()
