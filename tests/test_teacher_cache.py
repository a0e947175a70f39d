"""pepemb/teacher_cache.py, cache_teacher.py and distill.py --teacher_cache: teacher once, students many."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cache_teacher
import distill
from architecture import ResidueTokenizer, Student, StudentConfig, load_student
from conftest import tiny_student, write_short_uniprot
from pepemb import data
from pepemb.cli import UserError
from pepemb.data import MaskedBatches
from pepemb.losses import distillation_loss
from pepemb.options import masking, teacher_source, training_sequences
from pepemb.teacher import PROTBERT_VOCAB, load_teacher
from pepemb.teacher_cache import TeacherCache, data_hash, describe_teacher
from pepemb.teacher_targets import TeacherTargets, load_teacher_targets

VAL = data.VALIDATION_VARIANT
K = 2


@pytest.fixture(scope="module")
def tiny_fasta(tmp_path_factory):
    """40 real UniProt sequences cut to 30 residues: 32 train, 4 val, 4 test; cropped to 22 in training."""
    return write_short_uniprot(tmp_path_factory.mktemp("data") / "tiny.fasta", 40, 30)


@pytest.fixture(scope="module")
def teacher_dir(protbert_teacher_dir, tmp_path_factory):
    """A copy of the tiny teacher that a test may move away to show it is not needed."""
    return shutil.copytree(protbert_teacher_dir, tmp_path_factory.mktemp("teacher") / "protbert")


def flags(teacher, fasta, cache, *extra):
    """The data, teacher and masking flags shared by distill.py and cache_teacher.py."""
    return [
        "--data_path",
        str(fasta),
        "--teacher_model",
        str(teacher),
        "--max_seq_len",
        "24",
        "--batch_size",
        "8",
        "--seed",
        "3",
        "--teacher_cache",
        str(cache),
        "--mask_variants",
        str(K),
        *extra,
    ]


def student_flags(output_dir, *extra):
    return [
        "--output_dir",
        str(output_dir),
        *tiny_student(),
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "2",
        "--log_every",
        "2",
        "--eval_every",
        "4",
        "--num_epochs",
        "3",
        *extra,
    ]


def summary_of(output_dir):
    return json.loads((output_dir / "summary.json").read_text())


def val_records(output_dir):
    return [r for r in map(json.loads, open(output_dir / "metrics.jsonl")) if r["split"] == "val"]


def parsed(argv):
    return distill.build_parser().parse_args(argv)


def open_targets(args, variants):
    """distill.py's teacher set-up on CPU: the teacher is loaded unless the cache serves `variants`."""
    train_seqs, val_seqs = training_sequences(args)
    return load_teacher_targets(
        teacher_source(args), masking(args), train_seqs, val_seqs, torch.device("cpu"), half=False, variants=variants
    )


# --------------------------------------------------------------------------------------------
# The cache against the live teacher
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["masked", "all"])
def test_a_step_from_the_cache_has_the_live_teacher_loss(teacher_dir, tiny_fasta, tmp_path, positions):
    args = parsed(flags(teacher_dir, tiny_fasta, tmp_path / "cache", "--distill_positions", positions))
    train_seqs, _ = training_sequences(args)
    targets = open_targets(args, [VAL, 0, 1])
    filling = MaskedBatches(train_seqs, targets.tokenizer, masking(args), epoch=0, train=True, mask_variant=0)
    for batch in filling:
        targets(batch, 0)
    assert targets.cache.is_complete(0) and not targets.cache.is_complete(1)
    assert targets.batches == {"live": len(filling), "cached": 0}

    torch.manual_seed(0)
    student = Student(StudentConfig.from_tokenizer(targets.tokenizer, d_model=32, num_heads=2, num_layers=1)).eval()
    # epoch 2 reads variant 0 again, in other batches: each sequence's rows must still line up
    replay = MaskedBatches(train_seqs, targets.tokenizer, masking(args), epoch=2, train=True, mask_variant=0)
    assert replay.batches != filling.batches
    for batch in replay:
        cached = targets(batch, 0)["logits"]
        live = targets.teacher(batch["input_ids"], batch["attention_mask"])["logits"]
        student_logits = student(batch["input_ids"], batch["attention_mask"])["logits"]
        losses = [
            distillation_loss(
                student_logits,
                t,
                batch["labels"],
                batch["attention_mask"],
                temperature=2.0,
                distill_weight=0.5,
                task_weight=0.5,
                distill_positions=positions,
            )["loss"]
            for t in (cached, live)
        ]
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-3)
        stored = data.kl_positions(batch["labels"], batch["attention_mask"], positions)
        assert torch.allclose(cached[stored], live[stored], rtol=1e-3, atol=1e-3)
        assert torch.isnan(cached[~stored]).all()  # positions the cache does not hold are never silently 0
    assert targets.batches["cached"] == len(replay)
    offsets = np.load(tmp_path / "cache" / "train0.offsets.npy")
    alone = [data.masked_batch(train_seqs, [j], targets.tokenizer, 24, 0.15, 3, 0) for j in range(len(train_seqs))]
    expected = [int(data.kl_positions(b["labels"], b["attention_mask"], positions).sum()) for b in alone]
    assert np.diff(offsets).tolist() == expected
    targets.cache.close()


def test_epoch_e_uses_mask_variant_e_mod_k(tiny_fasta, teacher_dir, tmp_path):
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)

    def masks_by_sequence(args, epoch):
        batches = MaskedBatches(
            training_sequences(args)[0],
            tokenizer,
            masking(args),
            epoch,
            train=True,
            mask_variant=distill.mask_variant(epoch, args),
        )
        masks = {}
        for batch in batches:
            for row, j in enumerate(batch["sequence_index"].tolist()):
                masks[j] = batch["labels"][row][batch["attention_mask"][row].bool()].tolist()
        return batches.mask_variant, masks

    cached = parsed(flags(teacher_dir, tiny_fasta, tmp_path / "cache"))
    runs = [masks_by_sequence(cached, epoch) for epoch in range(5)]
    assert [variant for variant, _ in runs] == [0, 1, 0, 1, 0]
    assert runs[0][1] == runs[2][1] == runs[4][1] and runs[1][1] == runs[3][1] != runs[0][1]
    live = parsed(flags(teacher_dir, tiny_fasta, tmp_path / "cache"))
    live.teacher_cache = None  # fresh masks every epoch
    fresh = [masks_by_sequence(live, epoch) for epoch in range(3)]
    assert [variant for variant, _ in fresh] == [0, 1, 2]
    assert fresh[0][1] == runs[0][1] and fresh[2][1] != fresh[0][1]
    # Masked-LM training reads only the cache's validation part: its training masks stay fresh.
    mlm = parsed(flags(teacher_dir, tiny_fasta, tmp_path / "cache", "--distill_weight", "0", "--task_weight", "1"))
    assert [masks_by_sequence(mlm, epoch)[1] for epoch in range(3)] == [masks for _, masks in fresh]


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filled_cache(teacher_dir, tiny_fasta, tmp_path_factory):
    """A cache filled by cache_teacher.py: every training variant and the validation set."""
    cache = tmp_path_factory.mktemp("filled") / "cache"
    cache_teacher.main(flags(teacher_dir, tiny_fasta, cache))
    return cache


def test_cache_teacher_fills_every_variant(filled_cache, teacher_dir, tiny_fasta, capsys):
    manifest = json.loads((filled_cache / "manifest.json").read_text())
    assert sorted(manifest["complete"]) == ["train0", "train1", "val"]
    assert manifest["complete"]["val"]["sequences"] == 4 and manifest["complete"]["train0"]["sequences"] == 32
    assert (manifest["vocab_size"], manifest["precision"], manifest["mask_variants"]) == (30, "fp16", K)
    assert ResidueTokenizer.from_dict(manifest["tokenizer"]).vocab == PROTBERT_VOCAB
    for part, info in manifest["complete"].items():
        logits = np.load(filled_cache / f"{part}.logits.npy", mmap_mode="r")
        offsets = np.load(filled_cache / f"{part}.offsets.npy")
        assert logits.shape == (info["positions"], 30) == (offsets[-1], 30) and logits.dtype == np.float16
        assert np.isfinite(logits).all() and (np.diff(offsets) >= 1).all()
    assert not list(filled_cache.glob("*partial*")) and not list(filled_cache.glob("*filled*"))
    capsys.readouterr()
    cache_teacher.main(flags(teacher_dir, tiny_fasta, filled_cache))  # complete: nothing to do, no teacher
    assert "not loaded" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda a: a.__setitem__(a.index("--teacher_model") + 1, "elsewhere/other_teacher"), "teacher (cached"),
        (lambda a: a.__setitem__(a.index("--seed") + 1, "4"), "data_hash"),  # another split: other sequences
        (lambda a: a.extend(["--mask_prob", "0.2"]), "mask_prob (cached 0.15, now 0.2)"),
        (lambda a: a.__setitem__(a.index("--mask_variants") + 1, "3"), "mask_variants (cached 2, now 3)"),
        (lambda a: a.extend(["--distill_positions", "all"]), "distill_positions"),
    ],
)
def test_a_cache_made_otherwise_is_refused_naming_the_field(
    filled_cache, teacher_dir, tiny_fasta, tmp_path, change, field
):
    argv = flags(teacher_dir, tiny_fasta, filled_cache)
    change(argv)
    with pytest.raises(UserError, match="other settings") as err:
        distill.main(argv + student_flags(tmp_path / "run"))
    assert field in str(err.value)


def test_another_data_set_is_refused(filled_cache, teacher_dir, tiny_fasta, tmp_path):
    other = tmp_path / "other.fasta"  # the same split of other sequences: each one reversed
    data.write_fasta(other, [data.Protein(p.id, "", p.sequence[::-1]) for p in data.read_fasta(tiny_fasta)])
    with pytest.raises(UserError, match=r"data_hash \(cached '[0-9a-f]{16}', now '[0-9a-f]{16}'\)"):
        cache_teacher.main(flags(teacher_dir, other, filled_cache))


def test_a_teacher_with_another_vocabulary_is_refused(teacher_dir, esm_teacher_dir, tiny_fasta, tmp_path):
    args = parsed(flags(teacher_dir, tiny_fasta, tmp_path / "cache"))
    open_targets(args, [VAL]).cache.close()
    # the same --teacher_model folder now holds another model: caught when it is loaded to fill the cache
    shutil.move(teacher_dir, tmp_path / "protbert")
    shutil.copytree(esm_teacher_dir, teacher_dir)
    try:
        with pytest.raises(UserError, match="another vocabulary: vocab_hash"):
            open_targets(args, [VAL])
    finally:
        shutil.rmtree(teacher_dir)
        shutil.move(tmp_path / "protbert", teacher_dir)


def test_what_the_cache_cannot_serve_is_refused(teacher_dir, tiny_fasta, tmp_path):
    with pytest.raises(UserError, match="stores logits only; drop --hidden_weight"):
        distill.main(
            flags(teacher_dir, tiny_fasta, tmp_path / "cache")
            + student_flags(tmp_path / "run", "--hidden_weight", "0.1")
        )
    big = SimpleNamespace(
        name="big-vocab LM",
        tokenizer=ResidueTokenizer.from_vocab(PROTBERT_VOCAB + [f"<extra_{i}>" for i in range(1000)]),
    )
    with pytest.raises(UserError, match="only small vocabularies .* are cached"):
        TeacherCache(tmp_path / "cache").start_filling(big, {}, [], [])
    (tmp_path / "not_a_cache").mkdir()
    (tmp_path / "not_a_cache" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a teacher cache"):
        TeacherCache(tmp_path / "not_a_cache")


def test_one_filler_at_a_time(teacher_dir, tiny_fasta, tmp_path):
    args = parsed(flags(teacher_dir, tiny_fasta, tmp_path / "cache"))
    first = open_targets(args, [VAL])
    with pytest.raises(UserError, match="being filled by another process"):
        cache_teacher.main(flags(teacher_dir, tiny_fasta, tmp_path / "cache"))
    first.cache.close()


# --------------------------------------------------------------------------------------------
# Killed fills continue
# --------------------------------------------------------------------------------------------


def test_a_killed_fill_is_completed_to_the_same_bytes(filled_cache, teacher_dir, tiny_fasta, tmp_path):
    cache_dir = tmp_path / "cache"
    args = parsed(flags(teacher_dir, tiny_fasta, cache_dir))
    train_seqs, val_seqs = training_sequences(args)
    teacher = load_teacher(str(teacher_dir))
    cache = TeacherCache(cache_dir)
    settings = teacher_source(args).cache_settings(masking(args), data_hash(train_seqs, val_seqs))
    cache.start_filling(teacher, settings, train_seqs, val_seqs)
    targets = TeacherTargets(teacher, cache, teacher.tokenizer, describe_teacher(teacher))
    batches = MaskedBatches(train_seqs, teacher.tokenizer, masking(args), epoch=0, train=True, mask_variant=0)
    targets(batches[0], 0)
    targets(batches[1], 0)
    cache.flush()
    targets(batches[2], 0)  # written, never flushed: the process dies here
    cache.close()

    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] == {}
    filled = np.load(cache_dir / "train0.filled.npy")
    assert sorted(np.flatnonzero(filled)) == sorted(batches.batches[0] + batches.batches[1])

    cache_teacher.main(flags(teacher_dir, tiny_fasta, cache_dir))
    for part in ("val", "train0", "train1"):
        for kind in ("logits", "offsets"):
            assert (cache_dir / f"{part}.{kind}.npy").read_bytes() == (filled_cache / f"{part}.{kind}.npy").read_bytes()


# --------------------------------------------------------------------------------------------
# distill.py: fill while training, then train without the teacher
# --------------------------------------------------------------------------------------------

RUN = ("--dropout", "0.1", "--save_every", "2", "--keep_last", "0")


@pytest.fixture(scope="module")
def first_run(teacher_dir, tiny_fasta, tmp_path_factory):
    """3 epochs with an empty cache and K = 2: epochs 0 and 1 fill it, epoch 2 reads variant 0."""
    root = tmp_path_factory.mktemp("first")
    distill.main(flags(teacher_dir, tiny_fasta, root / "cache") + student_flags(root / "run", *RUN))
    return root


def test_training_fills_the_cache_and_then_reads_it(first_run):
    summary = summary_of(first_run / "run")
    assert summary["steps"] == 12 and summary["teacher_loaded"]
    # 4 batches in each of epochs 0 and 1 and the one validation batch through the teacher; epoch 2 cached
    assert summary["teacher_batches"] == {"live": 4 + 4 + 1, "cached": 4}
    manifest = json.loads((first_run / "cache" / "manifest.json").read_text())
    assert sorted(manifest["complete"]) == ["train0", "train1", "val"]


def test_a_second_student_trains_from_the_cache_without_the_teacher(first_run, teacher_dir, tiny_fasta, tmp_path):
    hidden = tmp_path / "teacher_elsewhere"
    shutil.move(teacher_dir, hidden)  # the teacher path no longer exists: it must not be needed
    try:
        distill.main(
            flags(teacher_dir, tiny_fasta, first_run / "cache")
            + student_flags(tmp_path / "run", "--d_model", "48", "--learning_rate", "1e-3")
        )
    finally:
        shutil.move(hidden, teacher_dir)
    summary, first = summary_of(tmp_path / "run"), summary_of(first_run / "run")
    assert not summary["teacher_loaded"] and summary["teacher_batches"]["live"] == 0
    assert summary["teacher_batches"]["cached"] == 12 + 1
    assert summary["teacher"] == first["teacher"] and summary["teacher_parameters"] == first["teacher_parameters"]
    assert summary["student_parameters"] > first["student_parameters"]
    ours, theirs = val_records(tmp_path / "run"), val_records(first_run / "run")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):  # the same validation masks and teacher logits; another student
        assert a["masked_tokens"] == b["masked_tokens"] and a["teacher_masked_acc"] == b["teacher_masked_acc"]
        assert 0 <= a["agreement"] <= 1
    assert load_student(tmp_path / "run" / "best_model").metadata["teacher"] == str(teacher_dir)


def test_resume_mid_fill_reaches_the_same_weights(first_run, teacher_dir, tiny_fasta, tmp_path):
    # A run stopped at step 2 leaves variant 0 half filled (its first 2 of 4 batches)...
    cache = tmp_path / "cache"
    distill.main(flags(teacher_dir, tiny_fasta, cache) + student_flags(tmp_path / "stopped", *RUN, "--max_steps", "2"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert list(manifest["complete"]) == ["val"] and np.load(cache / "train0.filled.npy").sum() == 16
    # ... and the full run's step-2 checkpoint, resumed on that cache, must end where the full run did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first_run / "run" / "checkpoint-2", resumed / "checkpoint-2")
    distill.main(flags(teacher_dir, tiny_fasta, cache) + student_flags(resumed, *RUN, "--resume", "auto"))
    assert summary_of(resumed)["teacher_batches"] == {"live": 2 + 4, "cached": 4 + 1}
    a = load_student(first_run / "run" / "checkpoint-12").model.state_dict()
    b = load_student(resumed / "checkpoint-12").model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for part in ("val", "train0", "train1"):
        assert (cache / f"{part}.logits.npy").read_bytes() == (first_run / "cache" / f"{part}.logits.npy").read_bytes()


def test_evaluate_sees_the_validation_masks_of_distill(first_run, teacher_dir, tiny_fasta, tmp_path):
    import evaluate

    val_fasta = tmp_path / "val.fasta"
    data.write_fasta(val_fasta, data.load_splits(tiny_fasta, seed=3)["val"])
    last = val_records(first_run / "run")[-1]
    for batch_size in (1, 3):  # distill evaluated its 4 validation sequences in one batch of 8
        report = evaluate.evaluate_checkpoint(
            first_run / "run" / "checkpoint-12",
            val_fasta,
            tmp_path / "eval",
            teacher_model=str(teacher_dir),
            batch_size=batch_size,
            seed=3,
            speed_batches=0,
            device="cpu",
        )
        assert report["counts"]["masked_tokens"] == last["masked_tokens"]
        assert report["metrics"]["teacher"]["masked_acc"] == pytest.approx(last["teacher_masked_acc"])
        assert report["metrics"]["student"]["masked_acc"] == pytest.approx(last["masked_acc"])


def test_masked_lm_training_needs_only_the_validation_part_of_a_cache(teacher_dir, tiny_fasta, tmp_path):
    # A run stopped at step 2 completes the validation part and half of training variant 0.
    cache = tmp_path / "cache"
    distill.main(flags(teacher_dir, tiny_fasta, cache) + student_flags(tmp_path / "stopped", *RUN, "--max_steps", "2"))
    assert list(json.loads((cache / "manifest.json").read_text())["complete"]) == ["val"]
    hidden = tmp_path / "teacher_elsewhere"
    shutil.move(teacher_dir, hidden)  # plain masked LM over 3 epochs (more than K) must not need the teacher
    try:
        distill.main(
            flags(teacher_dir, tiny_fasta, cache, "--distill_weight", "0", "--task_weight", "1")
            + student_flags(tmp_path / "mlm")
        )
    finally:
        shutil.move(hidden, teacher_dir)
    summary = summary_of(tmp_path / "mlm")
    assert summary["steps"] == 12 and not summary["teacher_loaded"]
    assert summary["teacher_batches"] == {"live": 0, "cached": 1}  # the validation batch, once
    assert all(0 <= r["agreement"] <= 1 for r in val_records(tmp_path / "mlm"))
