"""`okd analyze`: every metric on hand-made distributions with known answers, then the command on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from okd import analysis as A
from okd.cli import _collect_repeated, _normalise_option_names, main

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# Per-token metrics on known distributions
# --------------------------------------------------------------------------------------------------


def test_identical_distributions():
    logits = torch.randn(3, 4, 20)
    m = A.pair_metrics(logits, logits.clone(), top_ks=(5, 10), rank_top=50)
    p = torch.softmax(logits.double(), -1)
    for k in (5, 10):
        top_mass = p.sort(-1, descending=True).values[..., :k].sum(-1)
        assert torch.equal(m[f"top{k}_overlap"], torch.ones(3, 4, dtype=torch.float64))
        torch.testing.assert_close(m[f"top{k}_coverage"], top_mass)
        torch.testing.assert_close(m[f"student_mass_outside_teacher_top{k}"], 1 - top_mass)
        torch.testing.assert_close(m[f"teacher_mass_outside_student_top{k}"], 1 - top_mass)
    assert torch.equal(m["top1_agreement"], torch.ones(3, 4, dtype=torch.float64))
    for key in ("forward_kl", "reverse_kl", "tvd", "entropy_gap", "abs_entropy_gap"):
        assert m[key].abs().max() < 1e-12, key
    torch.testing.assert_close(m["spearman_top50"], torch.ones(3, 4, dtype=torch.float64))  # n=50 clamps to V=20
    assert all(v.dtype == torch.float64 and v.shape == (3, 4) for v in m.values())


def test_disjoint_supports():
    t = torch.tensor([[0.0, 0.0, 0.0, NEG_INF, NEG_INF, NEG_INF]])
    s = torch.tensor([[NEG_INF, NEG_INF, NEG_INF, 0.0, 0.0, 0.0]])
    m = A.pair_metrics(t, s, top_ks=(3,))
    assert m["tvd"].item() == pytest.approx(1.0)
    assert m["top1_agreement"].item() == 0.0
    assert m["top3_overlap"].item() == 0.0 and m["top3_coverage"].item() == 0.0
    assert m["student_mass_outside_teacher_top3"].item() == pytest.approx(1.0)
    assert m["forward_kl"].item() == math.inf and m["reverse_kl"].item() == math.inf
    # Very negative instead of -inf: finite, same picture.
    t2, s2 = t.clamp_min(-1e4), s.clamp_min(-1e4)
    assert A.tvd_tokens(t2, s2).item() == pytest.approx(1.0)
    assert A.topk_coverage(t2, s2, k=3).item() < 1e-300
    assert math.isfinite(A.forward_kl_tokens(t2, s2).item())


def test_uniform_versus_one_hot():
    v = 8
    uniform = torch.zeros(1, v)
    one_hot = torch.full((1, v), NEG_INF)
    one_hot[0, 2] = 0.0
    m = A.pair_metrics(uniform, one_hot, top_ks=(1,))
    assert m["teacher_entropy"].item() == pytest.approx(math.log(v))
    assert m["student_entropy"].item() == 0.0
    assert m["entropy_gap"].item() == pytest.approx(-math.log(v))
    assert m["forward_kl"].item() == math.inf  # the teacher gives mass where the student gives none
    assert m["reverse_kl"].item() == pytest.approx(math.log(v))  # 1 * log(1 / (1/8))
    assert m["tvd"].item() == pytest.approx(0.5 * ((1 - 1 / v) + (v - 1) / v))  # = 7/8
    assert m["top1_coverage"].item() == pytest.approx(1 / v)
    assert m["teacher_mass_outside_student_top1"].item() == pytest.approx(1 - 1 / v)
    # Roles swapped: forward KL is now log V and reverse KL infinite.
    assert A.forward_kl_tokens(one_hot, uniform).item() == pytest.approx(math.log(v))
    assert A.reverse_kl_tokens(one_hot, uniform).item() == math.inf
    assert A.entropy(uniform).item() == pytest.approx(math.log(v))


def test_individual_functions_match_pair_metrics_and_okd_divergences():
    from okd.divergences import forward_kl, reverse_kl, total_variation

    t, s = torch.randn(2, 5, 30) * 3, torch.randn(2, 5, 30) * 3
    m = A.pair_metrics(t, s, top_ks=(5, 10), rank_top=12)
    assert torch.equal(m["top1_agreement"], A.top1_agreement(t, s))
    for k in (5, 10):
        torch.testing.assert_close(m[f"top{k}_overlap"], A.topk_overlap(t, s, k))
        torch.testing.assert_close(m[f"top{k}_coverage"], A.topk_coverage(t, s, k))
        outside_s, outside_t = A.tail_mass(t, s, k)
        torch.testing.assert_close(m[f"student_mass_outside_teacher_top{k}"], outside_s)
        torch.testing.assert_close(m[f"teacher_mass_outside_student_top{k}"], outside_t)
        torch.testing.assert_close(outside_t, 1 - m[f"top{k}_coverage"])
    torch.testing.assert_close(m["spearman_top12"], A.spearman_top(t, s, 12))
    for ours, theirs, key in ((A.forward_kl_tokens, forward_kl, "forward_kl"), (A.reverse_kl_tokens, reverse_kl, "reverse_kl"),
                              (A.tvd_tokens, total_variation, "tvd")):
        torch.testing.assert_close(ours(t, s), m[key])
        torch.testing.assert_close(ours(t, s), theirs(t, s, reduction="none").double(), rtol=1e-4, atol=1e-5)


def test_spearman_known_permutations_and_ties():
    n = 10
    t = torch.arange(n, dtype=torch.float32).unsqueeze(0)
    assert A.spearman_top(t, t.flip(-1), n).item() == pytest.approx(-1.0)
    swapped = t.clone()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]  # one adjacent swap: sum d^2 = 2
    assert A.spearman_top(t, swapped, n).item() == pytest.approx(1 - 6 * 2 / (n * (n**2 - 1)))
    # Ties share their average rank: ranks [1,2,3,4] vs [1.5,1.5,3.5,3.5] -> rho = 4 / sqrt(5 * 4).
    assert A.spearman_top(torch.tensor([[0.0, 1, 2, 3]]), torch.tensor([[0.0, 0, 1, 1]]), 4).item() == pytest.approx(4 / math.sqrt(20))
    # A constant side has no defined correlation: 0 by definition.
    assert A.spearman_top(t, torch.zeros(1, n), n).item() == 0.0
    # Only the teacher's top-n tokens count: scrambling the rest changes nothing.
    t20 = torch.arange(20, dtype=torch.float32).unsqueeze(0)
    s20 = t20.clone()
    s20[0, :15] = s20[0, :15].flip(-1)
    assert A.spearman_top(t20, s20, 5).item() == pytest.approx(1.0)
    assert A.spearman_top(t20, s20, 20).item() < 0.9


def test_masked_positions_are_ignored():
    from okd.training import next_token_targets

    t, s = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    labels = torch.tensor([[-100, -100, 3, 4]])  # positions 1 and 2 predict response tokens
    _, mask = next_token_targets(labels)
    assert mask.tolist() == [[False, True, True, False]]
    expected = A.forward_kl_tokens(t[:, 1:3], s[:, 1:3]).mean().item()
    t[:, [0, 3]] = float("nan")  # garbage where nothing counts must not leak
    assert A.masked_mean(A.forward_kl_tokens(t, s), mask) == pytest.approx(expected)
    assert math.isnan(A.masked_mean(A.tvd_tokens(t, s), torch.zeros(1, 4, dtype=torch.bool)))


def test_expected_calibration_error_known_answer():
    # Bin (0.8667, 0.9333]: 4 tokens at 0.9, 3 right -> |0.75 - 0.9| = 0.15 on 4/6 of the tokens.
    # Bin (0.2667, 0.3333]: 2 tokens at 0.3, 1 right -> |0.5 - 0.3| = 0.2 on 2/6.
    confidence = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])
    correct = torch.tensor([1, 1, 1, 0, 0, 1])
    assert A.expected_calibration_error(confidence, correct) == pytest.approx((4 * 0.15 + 2 * 0.2) / 6)
    # Bins from separate batches add up to the bins of the whole.
    bins = A.calibration_bins(confidence[:3], correct[:3]) + A.calibration_bins(confidence[3:], correct[3:])
    assert A.ece_from_bins(bins) == pytest.approx(1 / 6)
    assert A.expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([1, 0])) == 0.0  # edges binned
    # model_metrics: confidence = max prob, accuracy = argmax is the target, nll = -log p(target).
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]))
    m = A.model_metrics(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(m["confidence"], torch.tensor([0.7, 0.5], dtype=torch.float64))
    assert m["accuracy"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(m["nll"], -torch.log(torch.tensor([0.7, 0.25], dtype=torch.float64)))


def test_ex_acc_err_arithmetic():
    student = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 99.0]])
    alive = torch.tensor([[True, True, True], [True, True, False]])  # row 2 ended: its 99 never counts
    regret = A.accumulated_error(student, alive)
    torch.testing.assert_close(regret, torch.tensor([1.5, 3.0, 3.5], dtype=torch.float64))
    oracle = A.accumulated_error(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(oracle, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(A.ex_acc_err(regret, oracle), torch.tensor([50.0, 50.0, 100 / 6], dtype=torch.float64))
    assert math.isnan(A.ex_acc_err(torch.tensor([1.0]), torch.tensor([0.0])).item())


def test_repeated_student_flags_accumulate():
    argv = _collect_repeated(_normalise_option_names(["analyze", "--student", "a", "--teacher", "t", "--student=[b,c]", "--no-progress"]))
    assert argv == ["analyze", "--student", '["a", "b", "c"]', "--teacher", "t", "--progress", "false"]
    assert _collect_repeated(["eval", "--student", "a"]) == ["eval", "--student", "a"]


def test_analysis_config_groups_the_options():
    """analyze's keyword options are AnalysisConfig's fields: keywords override a given config; bad ones fail in one line."""
    base = A.AnalysisConfig(batch_size=2, exposure_examples=0)
    merged = A.AnalysisConfig.from_options(base, seed=3)
    assert (merged.batch_size, merged.exposure_examples, merged.seed) == (2, 0, 3)
    assert A.AnalysisConfig.from_options(None, top_ks=(1,)) == A.AnalysisConfig(top_ks=(1,))
    assert base.seed == 0  # the given config is not modified
    with pytest.raises(TypeError, match="unknown analysis option.*batchsize"):
        A.AnalysisConfig.from_options(None, batchsize=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        A.AnalysisConfig(batch_size=0)
    with pytest.raises(ValueError, match="top_ks must be a non-empty list"):
        A.AnalysisConfig(top_ks=())


# --------------------------------------------------------------------------------------------------
# On tiny models
# --------------------------------------------------------------------------------------------------


def _save_student(path, tokenizer, architecture="llama", seed=1, vocab_size=None, with_tokenizer=True):
    from okd.models import build_model, save_pretrained_atomic

    model = build_model(
        architecture, "nano", vocab_size or len(tokenizer), max_positions=64, seed=seed,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    save_pretrained_atomic(model, tokenizer if with_tokenizer else None, path)
    return path


def test_teacher_against_itself_and_token_bookkeeping(tiny_setting):
    from okd.data import InstructionDataset, read_jsonl
    from okd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_setting["teacher"])
    teacher = load_model(tiny_setting["teacher"])
    dataset = InstructionDataset(read_jsonl(tiny_setting["validation"])[:10], tokenizer, 48)
    result = A.analyze(teacher, {"self": teacher}, tokenizer, dataset, batch_size=4, exposure_examples=0, progress=False)
    entry = result["students"]["self"]
    response_tokens = sum(sum(label != -100 for label in dataset[i]["labels"]) for i in range(len(dataset)))
    assert entry["tokens"] == result["teacher"]["tokens"] == response_tokens
    assert entry["per_position"]["count"][0] == len(dataset)  # every response has a first token
    m = entry["metrics"]
    assert m["forward_kl"] < 1e-9 and m["reverse_kl"] < 1e-9 and m["tvd"] < 1e-9
    assert m["top1_agreement"] == 1.0 and m["top5_overlap"] == 1.0 and m["spearman_top50"] == pytest.approx(1.0)
    assert m["student_ece"] == pytest.approx(result["teacher"]["metrics"]["ece"])
    assert m["student_nll"] == pytest.approx(result["teacher"]["metrics"]["nll"])


def test_analyze_command_two_students(tiny_setting, tmp_path, capsys):
    from okd.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_setting["teacher"])
    run_dir = tmp_path / "kd_run"
    _save_student(run_dir / "student", tokenizer, "llama", seed=1)
    plain = _save_student(tmp_path / "plain_gpt2", tokenizer, "gpt2", seed=2)
    out = tmp_path / "analysis.json"
    main(["analyze", "--teacher", tiny_setting["teacher"], "--student", str(run_dir), "--student", str(plain),
          "--data", tiny_setting["validation"], "--json", str(out), "--plots", str(tmp_path / "plots"),
          "--max-examples", "12", "--batch-size", "4", "--exposure-examples", "6", "--max-new-tokens", "10",
          "--max-length", "48", "--no-progress"])
    printed = capsys.readouterr().out
    assert "| kd_run |" in printed and "| plain_gpt2 |" in printed and "| teacher |" in printed

    result = json.loads(out.read_text())
    assert list(result["students"]) == ["kd_run", "plain_gpt2"]
    expected = {
        "top1_agreement", "top5_overlap", "top10_overlap", "top5_coverage", "top10_coverage",
        "student_mass_outside_teacher_top5", "teacher_mass_outside_student_top5",
        "student_mass_outside_teacher_top10", "teacher_mass_outside_student_top10",
        "teacher_entropy", "student_entropy", "entropy_gap", "abs_entropy_gap",
        "forward_kl", "reverse_kl", "tvd", "spearman_top50",
        "student_nll", "student_accuracy", "student_confidence", "student_ece",
    }
    assert result["settings"]["exposure"]["l"] == [5, 10]
    for name, entry in result["students"].items():
        assert set(entry["metrics"]) == expected, name
        assert all(math.isfinite(v) for v in entry["metrics"].values()), name
        assert entry["tokens"] > 0 and sum(entry["entropy_gap_histogram"]["counts"]) == entry["tokens"]
        curve = entry["per_position"]
        assert len(curve["forward_kl"]) == len(curve["count"]) > 0 and all(math.isfinite(v) for v in curve["forward_kl"])
        ex = entry["exposure_bias"]
        for key in ("R", "eps", "ex_acc_err_percent", "ground_truth_accumulated_fkl"):
            assert len(ex[key]) == 2 and all(v is not None and math.isfinite(v) for v in ex[key]), (name, key)
        assert 0 <= ex["rouge_l"] <= 100 and math.isfinite(ex["ground_truth_fkl_per_token"])
        # Step 1 is predicted from the prompt alone, the same for both kinds of prefix.
        assert ex["mean_fkl_by_step"]["student"][0] == pytest.approx(ex["mean_fkl_by_step"]["teacher"][0])
    teacher = result["teacher"]
    assert all(math.isfinite(teacher["metrics"][k]) for k in ("nll", "accuracy", "ece", "entropy"))
    assert 0 <= teacher["samples"]["rouge_l"] <= 100
    for png in ("entropy_gap_hist.png", "topk_coverage.png", "exposure_bias.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_bad_input_is_one_line(tiny_setting, tmp_path, capsys):
    from okd.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_setting["teacher"])
    common = ["--teacher", tiny_setting["teacher"], "--data", tiny_setting["validation"], "--json", str(tmp_path / "x.json"),
              "--max-examples", "2", "--exposure-examples", "0", "--no-progress"]

    def error_of(*args):
        with pytest.raises(SystemExit) as raised:
            main(["analyze", *common, *args])
        assert raised.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("okd: error:") and len(err.splitlines()) == 1, err
        return err

    assert "missing_run" in error_of("--student", str(tmp_path / "missing_run"))
    # A head narrower than the tokenizer (saved without a tokenizer, so the width check is what catches it).
    narrow = _save_student(tmp_path / "narrow", tokenizer, vocab_size=len(tokenizer) - 10, with_tokenizer=False)
    err = error_of("--student", str(narrow))
    assert "'narrow'" in err and "logits widths" in err
    (tmp_path / "empty.jsonl").write_text("\n")
    common[3] = str(tmp_path / "empty.jsonl")
    assert "no examples" in error_of("--student", str(narrow))
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_saved_online_module_folds_into_a_plain_model(tiny_setting, tmp_path, kind):
    """``with_online_module`` computes exactly what ``Teacher`` computes with the same module."""
    from okd.config import OnlineModuleConfig
    from okd.models import load_model
    from okd.teacher import Teacher, with_online_module

    teacher = Teacher(load_model(tiny_setting["teacher"]), OnlineModuleConfig(kind=kind), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the module away from the identity
        for parameter in teacher.module_parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    teacher.save_module(tmp_path / "online_module")
    ids = torch.randint(3, 100, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = teacher(ids, mask)

    folded = with_online_module(load_model(tiny_setting["teacher"]), tmp_path / "online_module").eval()
    with torch.no_grad():
        got = folded(input_ids=ids, attention_mask=mask).logits
        plain = load_model(tiny_setting["teacher"])(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the module does change the teacher
    out = folded.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 12)


def test_analyze_against_the_adapted_teacher(tiny_setting, tmp_path):
    from okd.config import OnlineModuleConfig
    from okd.models import load_model, load_tokenizer
    from okd.teacher import Teacher

    tokenizer = load_tokenizer(tiny_setting["teacher"])
    run_dir = tmp_path / "okd_run"
    _save_student(run_dir / "student", tokenizer, "llama", seed=1)
    teacher = Teacher(load_model(tiny_setting["teacher"]), OnlineModuleConfig(), seed=0)
    teacher.save_module(run_dir / "online_module")  # a fresh module is the identity
    common = dict(max_examples=8, batch_size=4, exposure_examples=0, max_length=48, progress=False)
    base = A.run_analysis(tiny_setting["teacher"], [str(run_dir)], tiny_setting["validation"], **common)
    same = A.run_analysis(tiny_setting["teacher"], [str(run_dir)], tiny_setting["validation"], teacher_module=str(run_dir), **common)
    assert same["students"]["okd_run"]["metrics"] == pytest.approx(base["students"]["okd_run"]["metrics"], rel=1e-6, abs=1e-9)
    assert same["settings"]["teacher_module"] == str(run_dir)

    with torch.no_grad():
        teacher.adapter.up.bias.add_(torch.linspace(-1, 1, teacher.adapter.up.bias.numel()))
    teacher.save_module(run_dir / "online_module")
    moved = A.run_analysis(tiny_setting["teacher"], [str(run_dir)], tiny_setting["validation"], teacher_module=str(run_dir), **common)
    assert moved["students"]["okd_run"]["metrics"]["forward_kl"] != pytest.approx(base["students"]["okd_run"]["metrics"]["forward_kl"])
    with pytest.raises(FileNotFoundError, match="no online module"):
        A.run_analysis(tiny_setting["teacher"], [str(run_dir)], tiny_setting["validation"], teacher_module=str(tmp_path), **common)
