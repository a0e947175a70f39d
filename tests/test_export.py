"""The native export (pepemb/hf_export.py, `embed.py --export_hf`): a transformers ESM-2 model that a fresh
process loads without this repository, with the student's logits, tokens and embeddings."""

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import safetensors.torch
import torch

import embed
from architecture import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    EXPORTED_WEIGHTS,
    ResidueTokenizer,
    Student,
    StudentConfig,
    load_student,
    save_student,
)
from pepemb import cli, data
from pepemb.teacher import ESM2_VOCAB, PROTBERT_VOCAB

VOCABS = {"protbert": PROTBERT_VOCAB, "esm2": ESM2_VOCAB}


def run(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(embed.main, [str(a) for a in argv])
    return exit_info.value.code


def real_sequences() -> list[str]:
    """Two antibody chains and two short UniProt proteins from the shipped data."""
    antibodies = [p.sequence for p in data.read_fasta(data.SHIPPED_ANTIBODIES)[:2]]
    proteins = [p.sequence for p in data.read_fasta(data.SHIPPED_UNIPROT) if 30 < len(p.sequence) < 90][:2]
    return antibodies + proteins


def trained_like_student(vocab, teacher_hidden_size=None) -> tuple[Student, ResidueTokenizer]:
    """A student whose weights are far from initialisation (LayerNorms and biases included)."""
    tokenizer = ResidueTokenizer.from_vocab(vocab)
    torch.manual_seed(1)
    student = Student(
        StudentConfig.from_tokenizer(
            tokenizer, d_model=32, num_heads=4, num_layers=2, teacher_hidden_size=teacher_hidden_size
        )
    )
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return student.eval(), tokenizer


@pytest.fixture(scope="module", params=list(VOCABS))
def exported(request, tmp_path_factory):
    """(student, tokenizer, export folder, checkpoint folder) for each vocabulary."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    student, tokenizer = trained_like_student(VOCABS[request.param], teacher_hidden_size=12)
    save_student(
        student,
        root / "student",
        {"teacher": "antiberty", "step": 5, "distill_args": {"data_path": "ab.fasta", "temperature": 2.0}},
    )
    report = {
        "setup": {"sequences": 10, "data_path": "test.fasta"},
        "metrics": {
            "student": {"masked_acc": 0.612, "perplexity": 3.5},
            "teacher": {"masked_acc": 0.85},
            "agreement": 0.7,
        },
        "fidelity": {"mutation_effects": {"student": {"spearman": 0.812}}},
    }
    (root / "report.json").write_text(json.dumps(report))
    assert run([root / "student", "--export_hf", root / "hf", "--eval_report", root / "report.json"]) == 0
    return student, tokenizer, root / "hf", root


FRESH_PROCESS = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, pipeline
folder, sequences = sys.argv[1], json.loads(sys.argv[2])
try:
    import architecture
    sys.exit("this repository is importable: the test would prove nothing")
except ImportError:
    pass
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForMaskedLM.from_pretrained(folder).eval()
encoded = tokenizer(sequences, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**encoded).logits
    hidden = AutoModel.from_pretrained(folder).eval()(**encoded).last_hidden_state
mask = encoded["attention_mask"].clone()
mask[:, 0] = 0
mask[torch.arange(len(sequences)), encoded["attention_mask"].sum(1) - 1] = 0  # start and end tokens
pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
masked = sequences[0][:20] + tokenizer.mask_token + sequences[0][21:]
fills = pipeline("fill-mask", model=folder)(masked)
np.savez(sys.argv[3], input_ids=encoded["input_ids"].numpy(), logits=logits.numpy(), pooled=pooled.numpy(),
         fills=np.array([f["token_str"] for f in fills]), names=np.array(sorted(sys.modules)))
"""


def test_a_fresh_process_loads_the_export_without_this_repository(exported, tmp_path):
    student, tokenizer, folder, _ = exported
    sequences = real_sequences()
    out = tmp_path / "fresh.npz"
    result = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS, str(folder), json.dumps(sequences), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # every weight of the masked LM comes from the export (AutoModel alone adds ESM's untrained pooler)
    missing = [line for line in result.stderr.splitlines() if "| MISSING" in line]
    assert missing and all("pooler" in line for line in missing), missing
    assert "trust_remote_code" not in result.stderr
    fresh = np.load(out)
    input_ids, attention_mask = tokenizer.batch_encode(sequences)
    assert np.array_equal(fresh["input_ids"], input_ids.numpy())  # raw strings, no spaces: the student's ids
    with torch.no_grad():
        logits = student(input_ids, attention_mask)["logits"]
    real = attention_mask.bool().numpy()  # padding positions predict nothing and differ
    # fp32 through two attention implementations: ~1e-6 relative on logits of a few units; wrong weights give O(1)
    assert np.abs(fresh["logits"][real] - logits.numpy()[real]).max() < 1e-4
    assert len(fresh["fills"]) == 5 and all(f in tokenizer.vocab for f in fresh["fills"])
    assert not [n for n in fresh["names"] if n.split(".")[0] in ("architecture", "embed", "pepemb", "data")]


def test_pooled_hidden_states_equal_embed_py(exported, tmp_path):
    student, tokenizer, folder, root = exported
    sequences = real_sequences()
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(sequences)))
    assert run([root / "student", fasta, tmp_path / "emb"]) == 0
    ours = np.load(tmp_path / "emb" / "embeddings.npz")["mean_layer_2"]
    out = tmp_path / "fresh.npz"
    subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS, str(folder), json.dumps(sequences), str(out)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert np.abs(np.load(out)["pooled"] - ours).max() < 1e-5


def test_load_student_reads_the_export_back_exactly(exported):
    student, tokenizer, folder, _ = exported
    back = load_student(folder)
    assert back.metadata["step"] == 5 and back.tokenizer.vocab_hash == tokenizer.vocab_hash
    assert back.model.config == student.config
    theirs = back.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in student.state_dict().items())
    # every script that takes a student takes the export: embed.py treats it as one
    assert embed.load_embedder(str(folder), torch.device("cpu")).is_student


def test_the_model_card_says_what_the_student_is(exported):
    _, _, folder, _ = exported
    card = (folder / "README.md").read_text()
    for expected in (
        "antiberty",
        "pipeline_tag: fill-mask",
        "masked accuracy: student 0.612, teacher 0.850",
        "Spearman with the teacher: 0.812",
        "--export_hf",
        "licence: MIT",
        "Ruffolo",
        "teacher_map.safetensors",
    ):
        assert expected in card, expected
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "esm" and config["position_embedding_type"] == "rotary"
    assert not config.get("auto_map")  # no remote code
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # no pickle


def test_folders_of_the_old_export_layout_still_load(tmp_path):
    student, _ = trained_like_student(PROTBERT_VOCAB)
    folder = tmp_path / "old"
    folder.mkdir()
    config = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "weights": EXPORTED_WEIGHTS,
        "config": asdict(student.config),
        "metadata": {"step": 3},
    }
    (folder / "config.json").write_text(json.dumps(config))
    weights = {k: v.clone().contiguous() for k, v in student.state_dict().items()}
    safetensors.torch.save_file(weights, str(folder / EXPORTED_WEIGHTS))
    back = load_student(folder)
    assert back.metadata == {"step": 3}
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in student.state_dict().items())
