"""run_test_distillation.sh end to end in a reduced mode: offline fallback, every stage's output."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_pipeline_falls_back_to_the_offline_preset_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TEACHER": "Rostlab/prot_bert",
        "OUTPUT_DIR": str(out),
        "NUM_SEQUENCES": "60",
        "MAX_STEPS": "3",
        "D_MODEL": "32",
        "NUM_HEADS": "2",
        "NUM_LAYERS": "1",
        "BATCH_SIZE": "8",
        "DEVICE": "cpu",
        "SEQUENCE": "EVQLVESGGGLVQPGGSLRLSCAASGFTFS",
    }
    # from another directory: the script must find its own files
    result = subprocess.run(
        ["bash", str(REPO / "run_test_distillation.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OFFLINE PRESET" in result.stdout and "HF_HUB_OFFLINE" in result.stdout
    for stage in ("1/5 Data", "2/5 Weights & Biases", "3/5 Distillation", "4/5 Evaluation", "5/5 Visualization"):
        assert stage in result.stdout

    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["source"].endswith("antibody_sample.fasta") and stats["splits"]["train"]["count"] == 48
    summary = json.loads((out / "checkpoints" / "summary.json").read_text())
    assert summary["teacher"] == "antiberty" and summary["steps"] == 3
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["setup"]["sequences"] == 6 and report["metrics"]["teacher"]["masked_acc"] > 0.7
    for name in (
        "checkpoints/best_model/model.pt",
        "checkpoints/training_curves.png",
        "evaluation/report.md",
        "evaluation/per_residue_accuracy.png",
        "visualizations/summary.json",
        "visualizations/important_residues.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "masked accuracy on the test split" in result.stdout
    # the summary shows what the student keeps of the teacher beyond top-1, from the report
    mutations = report["fidelity"]["mutation_effects"]["student"]
    assert f"mutation effects, Spearman with the teacher: student {mutations['spearman']:.3f}" in result.stdout
    assert "representations: CKA" in result.stdout
