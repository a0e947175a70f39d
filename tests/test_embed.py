"""embed.py: batch-independent embeddings, window stitching, safe file names, resume, HF models
and the safetensors export, on a tiny student (d_model 32) and tiny random HF teachers."""

import json
import re

import numpy as np
import pytest
import safetensors.numpy
import torch

import embed
from architecture import ResidueTokenizer, Student, StudentConfig, load_student, save_student
from pepemb import cli, data, inference
from pepemb.teacher import PROTBERT_VOCAB

SEQUENCES = [
    "MKTAYIAKQR",
    "GSHMSLFDFFKNKGSAATATDRLKLLD",
    "ACDEFGHIKLMNPQRSTVWYACDEFGHIKLMNPQRSTVWYWW",
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAV",
]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = StudentConfig.from_tokenizer(
        ResidueTokenizer.from_vocab(PROTBERT_VOCAB), d_model=32, num_heads=2, num_layers=2, dropout=0.0
    )
    directory = tmp_path_factory.mktemp("student")
    save_student(Student(config), directory, {"step": 7})
    return directory


@pytest.fixture(scope="module")
def student(student_dir):
    return embed.load_embedder(str(student_dir), torch.device("cpu"))


def write_fasta(path, records):
    path.write_text("".join(f">{id_}\n{seq}\n" for id_, seq in records))
    return path


def run(argv) -> int:
    """embed.py as the shell runs it: its exit status (0, or 2 for a user error)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(embed.main, [str(a) for a in argv])
    return exit_info.value.code


def embedded(embedder, sequences, layers, **options) -> dict:
    return {r.index: r for r in inference.embed_sequences(embedder, sequences, layers, **options)}


def direct_hidden(embedder, sequence: str, layer: int) -> torch.Tensor:
    """The model's hidden states [tokens, D] for one sequence framed by cls/eos, no batching."""
    input_ids = embedder.tokenizer.encode(sequence)[None]
    return embedder.hidden_states(input_ids, torch.ones_like(input_ids))[layer][0].float()


# -- the embeddings themselves ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["student", "protbert", "esm2"])
def test_embedding_does_not_depend_on_the_rest_of_the_batch(kind, student, request):
    fixture = {"protbert": "protbert_teacher_dir", "esm2": "esm_teacher_dir"}.get(kind)
    embedder = embed.load_embedder(str(request.getfixturevalue(fixture)), torch.device("cpu")) if fixture else student
    last = embedder.num_layers
    alone = embedded(embedder, SEQUENCES[:1], [last])[0]
    batched = embedded(embedder, SEQUENCES, [last], max_tokens=10_000)  # one padded batch of 4
    assert len(data.batch_indices([len(s) + 2 for s in SEQUENCES], max_tokens=10_000, shuffle=False)) == 1
    torch.testing.assert_close(batched[0].per_residue[last], alone.per_residue[last], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[0].per_residue[last].mean(0), alone.per_residue[last].mean(0), atol=1e-5, rtol=0)
    assert alone.per_residue[last].shape == (len(SEQUENCES[0]), embedder.hidden_size)


def test_a_sequence_that_fits_one_window_is_embedded_exactly_as_the_model_gives_it(student):
    sequence = SEQUENCES[2]  # 42 residues
    plain = direct_hidden(student, sequence, -1)
    chunked = embedded(student, [sequence], [2], max_length=42, long="chunk", overlap=10)[0]
    assert chunked.windows == 1
    assert torch.equal(chunked.per_residue[2], plain[1:-1])
    assert torch.equal(chunked.cls[2], plain[0])


def test_window_starts_cover_the_sequence_with_the_requested_overlap():
    assert inference.window_starts(25, 10, 4) == [0, 6, 12, 15]
    assert inference.window_starts(11, 10, 4) == [0, 1]
    assert inference.window_starts(10, 10, 4) == [0]
    assert inference.window_starts(21, 10, 0) == [0, 10, 11]


def test_long_sequences_are_stitched_by_averaging_the_windows_that_cover_each_residue(student):
    sequence = SEQUENCES[3][:25]
    starts = [0, 6, 12, 15]  # windows of 10 residues, overlap >= 4, the last one flush with the end
    windows = [direct_hidden(student, sequence[s : s + 10], 1)[1:-1] for s in starts]
    expected = torch.stack(
        [torch.stack([w[r - s] for s, w in zip(starts, windows) if s <= r < s + 10]).mean(0) for r in range(25)]
    )
    # residue 13 lies in windows 6..15 and 12..21 only; residue 20 in the last two
    torch.testing.assert_close(expected[13], (windows[1][7] + windows[2][1]) / 2)

    result = embedded(student, [sequence, SEQUENCES[0]], [1], max_length=10, overlap=4)[0]
    assert result.windows == 4
    torch.testing.assert_close(result.per_residue[1], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.cls[1], direct_hidden(student, sequence[:10], 1)[0], atol=1e-6, rtol=0)

    truncated = embedded(student, [sequence], [1], max_length=10, long="truncate")[0]
    torch.testing.assert_close(truncated.per_residue[1], windows[0], atol=1e-6, rtol=0)


def test_a_5000_residue_protein_is_embedded_in_windows(student):
    sequence = (SEQUENCES[3] * 80)[:5000]
    result = embedded(student, [sequence], [2], max_tokens=2048)[0]  # windows of 1022, overlap 64
    assert result.windows == 6  # starts 0, 958, 1916, 2874, 3832 and 3978
    assert result.per_residue[2].shape == (5000, 32)
    assert torch.isfinite(result.per_residue[2]).all()


# -- files ------------------------------------------------------------------------------------


def test_file_names_are_safe_and_distinct():
    ids = [
        "P12345",
        "sp|P69905|HBA_HUMAN",
        "a b",
        "a/b",
        "a_b",
        "../../etc",
        "dup",
        "dup",
        "dup",
        "Case",
        "case",
        "x" * 300,
    ]
    names = embed.file_names(ids)
    assert len({n.lower() for n in names}) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,90}", n) for n in names)
    assert names[0] == "P12345" and names[4] == "a_b" and names[6] == "dup" and names[9] == "Case"
    assert names[1].startswith("sp_P69905_HBA_HUMAN-") and names[2].startswith("a_b-")
    assert names[2] != names[3]
    assert embed.file_names(ids) == names  # deterministic: --resume finds the same files


def test_fasta_to_files_with_duplicates_and_unsafe_ids(student_dir, tmp_path):
    records = [("sp|P1|A_HUMAN", SEQUENCES[0]), ("dup", SEQUENCES[1]), ("x/../y", SEQUENCES[2]), ("dup", SEQUENCES[3])]
    fasta = write_fasta(tmp_path / "in.fasta", records)
    out = tmp_path / "out"
    assert run([student_dir, fasta, out, "--include", "mean", "per_tok", "cls", "--repr_layers", "0", "-1"]) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["duplicate_ids"] == {"dup": 2}
    assert manifest["settings"]["layers"] == [0, 2] and manifest["embedding_dim"] == 32
    assert manifest["counts"]["sequences"] == 4
    npz = np.load(out / "embeddings.npz", allow_pickle=False)
    assert list(npz["ids"]) == [r[0] for r in records]
    assert list(npz["lengths"]) == [len(r[1]) for r in records]
    assert npz["mean_layer_2"].shape == (4, 32) and npz["cls_layer_0"].shape == (4, 32)
    files = list(npz["per_tok_files"])
    assert sorted(f"per_tok/{p.name}" for p in (out / "per_tok").iterdir()) == sorted(set(files))
    assert len(set(files)) == 4
    for row, file in enumerate(files):
        per_tok = safetensors.numpy.load_file(out / file)
        assert per_tok["layer_2"].shape == (len(records[row][1]), 32)
        np.testing.assert_allclose(per_tok["layer_2"].mean(0), npz["mean_layer_2"][row], atol=1e-6)


def test_resume_embeds_only_what_is_missing(student_dir, tmp_path, capsys):
    records = [(f"seq{i}", s) for i, s in enumerate(SEQUENCES + [s[::-1] for s in SEQUENCES])]
    fasta = write_fasta(tmp_path / "in.fasta", records)
    out = tmp_path / "out"
    argv = [student_dir, fasta, out, "--include", "mean", "per_tok", "--max_tokens", "100"]
    assert run(argv) == 0
    first = dict(np.load(out / "embeddings.npz"))
    # An interrupted run: two sequences never finished and embeddings.npz was never written;
    # and a per-residue file lost since.
    for name in ("seq2", "seq5"):
        (out / "partial" / f"{name}.safetensors").unlink()
        (out / "per_tok" / f"{name}.safetensors").unlink()
    (out / "embeddings.npz").unlink()
    (out / "per_tok" / "seq7.safetensors").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "per_tok").iterdir()}

    capsys.readouterr()
    assert run(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert run(argv + ["--resume", "--include", "mean"]) == 2  # other settings: refused
    assert "include" in capsys.readouterr().err

    assert run(argv + ["--resume"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["embedded_this_run"] == 3 and manifest["counts"]["already_done"] == 5
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # done sequences were not recomputed
    resumed = np.load(out / "embeddings.npz")
    assert list(resumed["ids"]) == [r[0] for r in records]
    np.testing.assert_allclose(resumed["mean_layer_2"], first["mean_layer_2"], atol=1e-5)
    assert not list(out.rglob("*.tmp"))

    assert run(argv + ["--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["embedded_this_run"] == 8


# -- HuggingFace models, layers, precision ---------------------------------------------------


def test_huggingface_teacher_embeds_like_its_own_tokenizer_and_model(protbert_teacher_dir, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    fasta = write_fasta(tmp_path / "in.fasta", [(f"s{i}", s) for i, s in enumerate(SEQUENCES)])
    out = tmp_path / "out"
    assert run([protbert_teacher_dir, fasta, out, "--repr_layers", "0", "-1"]) == 0
    npz = np.load(out / "embeddings.npz")
    assert npz["mean_layer_2"].shape == (4, 64) and npz["mean_layer_0"].shape == (4, 64)

    hf_tokenizer = AutoTokenizer.from_pretrained(protbert_teacher_dir)
    model = AutoModelForMaskedLM.from_pretrained(protbert_teacher_dir).eval()
    with torch.inference_mode():
        hidden = model(
            **hf_tokenizer(" ".join(SEQUENCES[1]), return_tensors="pt"), output_hidden_states=True
        ).hidden_states[-1][0]
    expected = hidden[1:-1].mean(0).numpy()
    np.testing.assert_allclose(npz["mean_layer_2"][1], expected, atol=1e-5)


def test_layers_out_of_range_and_bad_flags_are_user_errors(student_dir, protbert_teacher_dir, tmp_path, capsys):
    fasta = write_fasta(tmp_path / "in.fasta", [("a", SEQUENCES[0])])
    for model, layer in ((student_dir, "3"), (student_dir, "-4"), (protbert_teacher_dir, "5")):
        assert run([model, fasta, tmp_path / "out", "--repr_layers", layer]) == 2
        assert "out of range: the model has 2 layers" in capsys.readouterr().err
    assert run([student_dir, fasta, tmp_path / "out", "--max_length", "10", "--overlap", "10"]) == 2
    assert run([student_dir, fasta]) == 2
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_half_precision_on_cpu_warns_and_runs_in_fp32(student_dir, tmp_path):
    fasta = write_fasta(tmp_path / "in.fasta", [("a", SEQUENCES[0])])
    with pytest.warns(UserWarning, match="needs a GPU"):
        assert run([student_dir, fasta, tmp_path / "out", "--fp16", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["precision"] == "float32"


# -- export ----------------------------------------------------------------------------------


def test_export_hf_round_trip_gives_identical_embeddings(student_dir, tmp_path):
    exported = tmp_path / "hf"
    assert run([student_dir / "model.pt", "--export_hf", exported]) == 0
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    assert (exported / "vocab.txt").read_text().split() == PROTBERT_VOCAB
    checkpoint = load_student(exported)
    assert checkpoint.metadata == {"step": 7} and not checkpoint.model.training

    fasta = write_fasta(tmp_path / "in.fasta", [(f"s{i}", s) for i, s in enumerate(SEQUENCES)])
    for model, out in ((student_dir, "a"), (exported, "b")):
        assert run([model, fasta, tmp_path / out, "--include", "mean", "cls", "--repr_layers", "1", "2"]) == 0
    a, b = np.load(tmp_path / "a" / "embeddings.npz"), np.load(tmp_path / "b" / "embeddings.npz")
    for key in ("mean_layer_1", "mean_layer_2", "cls_layer_2"):
        assert np.array_equal(a[key], b[key])


def test_export_hf_refuses_a_huggingface_model(protbert_teacher_dir, tmp_path, capsys):
    assert run([protbert_teacher_dir, "--export_hf", tmp_path / "hf"]) == 2
    assert "needs a student checkpoint" in capsys.readouterr().err
