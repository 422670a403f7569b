"""Model cards (okd.model_card): the README.md of every student okd distill and okd model shrink save.

Each card's metadata block is read back with huggingface_hub (metadata_load, ModelCard, ModelCardData);
the cards of okd model convert are tested on the real model in test_pretrained.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load

import okd.model_card
from engine_helpers import configs
from okd.config import LoraStudentConfig, ModelConfig
from okd.model_card import check, hub_model_id, read_metadata
from okd.pretrained import shrink
from okd.training import distill


def _card(directory: Path) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    metadata = metadata_load(directory / "README.md")
    assert metadata == check(text)  # parses, round-trips through ModelCardData, has library_name and tags
    return metadata, ModelCard(text).text


def _metric(metadata: dict, metric_type: str) -> float:
    (result,) = metadata["model-index"][0]["results"]
    return {m["type"]: m["value"] for m in result["metrics"]}[metric_type]


def test_a_distilled_student_has_a_card(tiny_setting, tmp_path):
    out = tmp_path / "kd-run"
    distill(**configs(tiny_setting, "kd", steps=2), output_dir=str(out))
    metadata, body = _card(out / "student")
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"knowledge-distillation", "okd", "kd"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a student built from scratch has none
    final = json.loads((out / "train_summary.json").read_text())["final"]
    assert _metric(metadata, "cross_entropy") == pytest.approx(final["validation_ce"])
    assert _metric(metadata, "forward_kl") == pytest.approx(final["validation_divergence"])
    assert metadata["model-index"][0]["results"][0]["dataset"]["name"] == tiny_setting["validation"]
    assert f"from the teacher `{tiny_setting['teacher']}`" in body and "### Method: `kd`" in body
    assert "| divergence | `forward_kl` |" in body and "| kd_ratio | 1 |" in body and "| steps | 2 |" in body
    assert f"okd distill --config {out}/run_config.yaml --output-dir {out}-rerun" in body
    assert "Online module" not in body


def test_an_okd_lora_student_and_its_adapter_have_cards(tiny_setting, tmp_path):
    out = tmp_path / "okd-lora"
    kwargs = configs(tiny_setting, "okd", steps=2)
    kwargs["model"] = ModelConfig(**{**vars(kwargs["model"]), "student_lora": LoraStudentConfig(rank=4)})
    distill(**kwargs, output_dir=str(out))
    metadata, body = _card(out / "student")
    assert {"knowledge-distillation", "okd", "lora"} <= set(metadata["tags"])
    assert "### Online module (OKD)" in body and "| adapter_bottleneck | 64 |" in body and "| divergence | `jsd` |" in body
    assert "| lora_rank |" not in body  # the table leaves out the settings of the other module kind
    assert "validation_teacher_ce" in body  # the adapted teacher's scores, in the body only
    assert r"KL(frozen teacher \|\| adapted teacher)" in body  # a | inside a table cell is escaped
    assert {m["type"] for m in metadata["model-index"][0]["results"][0]["metrics"]} == {"cross_entropy", "forward_kl"}
    adapter, adapter_body = _card(out / "student_adapter")
    # okd's card replaces the one peft writes (whose base_model would be the student's local path).
    assert adapter["library_name"] == "peft" and "base_model" not in adapter
    assert "LoRA adapter" in adapter_body and "AutoPeftModelForCausalLM" in adapter_body


def test_shrunk_and_distilled_students_inherit_the_base_model(tiny_setting, tmp_path, capsys):
    teacher = Path(shutil.copytree(tiny_setting["teacher"], tmp_path / "teacher"))
    base = ModelCardData(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0", tags=["test"])
    ModelCard(f"---\n{base.to_yaml()}\n---\n\n# teacher\n").save(teacher / "README.md")
    student = shrink(str(teacher), str(tmp_path / "student-1l"), layers=1)
    metadata, body = _card(student)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and metadata["license"] == "apache-2.0"
    assert {"knowledge-distillation", "okd", "depth-pruning"} <= set(metadata["tags"])
    assert f"the teacher `{teacher}`" in body and f"okd model shrink --teacher {teacher}" in body

    kwargs = configs(tiny_setting, "rkl", steps=1)
    kwargs["model"] = ModelConfig(teacher=tiny_setting["teacher"], student=str(student))
    distill(**kwargs, output_dir=str(tmp_path / "run"))
    metadata, body = _card(tmp_path / "run" / "student")
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "rkl" in metadata["tags"]
    assert f"| student initialisation | `{student}` |" in body and "| divergence | `reverse_kl` |" in body


def test_a_card_that_cannot_be_made_never_stops_the_save(tiny_setting, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no card today")

    monkeypatch.setattr(okd.model_card, "distillation_card", broken)
    with pytest.warns(UserWarning, match=r"no model card written \(RuntimeError: no card today\)"):
        distill(**configs(tiny_setting, "sft", steps=1), output_dir=str(tmp_path / "run"))
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "student" / "README.md").exists()


def test_check_rejects_cards_without_the_metadata_okd_writes():
    with pytest.raises(ValueError, match="no tags"):
        check("---\nlibrary_name: transformers\n---\n\n# x\n")
    broken_index = "---\nlibrary_name: transformers\ntags: [okd]\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n"
    with pytest.raises((ValueError, KeyError)):
        check(broken_index)
    assert check("---\nlibrary_name: transformers\ntags: [okd]\n---\n")["tags"] == ["okd"]


def test_hub_ids_and_local_paths(tmp_path):
    assert hub_model_id("gpt2") == "gpt2"
    assert hub_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for local in ("runs/models/smollm2", "./student", "/models/x", "~/x", str(tmp_path), "", None):
        assert hub_model_id(local) is None, local
    (tmp_path / "x").mkdir()
    assert read_metadata(tmp_path / "x") == {}


def test_a_local_path_in_an_inherited_card_is_not_a_base_model(tmp_path):
    """peft's card names the model's local path as base_model: it is not passed on."""
    from okd.model_card import _lineage

    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "README.md").write_text(f"---\nbase_model: {tmp_path}/base\nlicense: mit\n---\n")
    assert _lineage(str(tmp_path / "init")) == {"license": "mit"}
    (tmp_path / "init" / "README.md").write_text("---\nbase_model: [org/a, /models/b]\n---\n")
    assert _lineage(str(tmp_path / "init")) == {"base_model": "org/a"}


def test_hub_student_and_hub_data_fill_base_model_and_datasets():
    """A card from a run record alone: a hub student is the base model, hub data sets are listed."""
    from okd.model_card import distillation_card

    run_config = {
        "model": {"teacher": "HuggingFaceTB/SmolLM2-360M-Instruct", "student": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "method": {"name": "gkd", "source": "on_policy", "divergence": "jsd", "divergence_params": {"beta": 0.5},
                   "kd_ratio": 1.0, "temperature": 1.0, "online_teacher": False, "objective": "distillation"},
        "online": None,
        "data": {"train_file": "hub:databricks/databricks-dolly-15k@train[:90%]",
                 "validation_file": "hub:databricks/databricks-dolly-15k@train[90%:]"},
        "train": {"batch_size": 8},
        "sampling": {"on_policy_ratio": 0.5, "temperature": 0.9},
        "minillm": None,
        "num_processes": 2,
    }
    summary = {"method": "gkd", "steps": 100, "train_seconds": 3600.0, "final": {"validation_ce": 1.5, "validation_divergence": 0.25}}
    metadata = check(distillation_card(run_config, summary, "runs/gkd"))
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["datasets"] == ["databricks/databricks-dolly-15k"]
    (result,) = metadata["model-index"][0]["results"]
    assert result["dataset"]["type"] == "databricks/databricks-dolly-15k" and metadata["model-index"][0]["name"] == "gkd"
    body = str(distillation_card(run_config, summary, "runs/gkd"))
    assert "| on_policy_ratio | 0.5 |" in body and "| sequences per step | 16 |" in body and "60.0 min" in body
    assert "num_processes" not in body.split("run_config.yaml</summary>")[1]  # the embedded config is the replayable one
