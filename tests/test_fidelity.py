"""bench/fidelity.py end to end on the shipped antibodies: AntiBERTy, a prefilled cache, two tiny
students capped at a few steps. The benchmark's numbers are not tested (they need quiet CPU
minutes); what it records and how it scores are."""

import json
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import evaluate  # noqa: E402
import fidelity  # noqa: E402
import fidelity_runs  # noqa: E402
import student_runs  # noqa: E402
from pepemb import data  # noqa: E402
from pepemb.cli import UserError  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("fidelity") / "out"
    fidelity.main(["--quick", "--budgets", "0.5", "--max_steps", str(STEPS), "--output_dir", str(output_dir)])
    return output_dir, json.loads((output_dir / "fidelity.json").read_text())


@pytest.mark.slow  # quick_run: a cache fill of 800 chains through AntiBERTy, two distill.py runs
def test_every_run_is_recorded_with_its_test_scores(quick_run):
    output_dir, results = quick_run
    assert results["setup"]["data"] == {
        "source": str(data.SHIPPED_ANTIBODIES),
        "note": "--quick: shipped 1,000-chain sample",
        "train": 800,
        "val": 100,
        "test": 100,
    }
    runs = {r["variant"]: r for r in results["runs"]}
    assert sorted(runs) == ["kd-cache", "mlm"]
    for r in runs.values():
        assert r["steps"] == STEPS and "error" not in r
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == STEPS
        assert 0 < r["test"]["masked_acc"] < r["test"]["teacher_masked_acc"] <= 1
        assert r["test"]["masked_tokens"] > 1000
    # the KD run trains from the cache filled before it; the masked-LM run never calls the teacher in training
    assert runs["kd-cache"]["teacher_batches"]["live"] == 0 and not runs["kd-cache"]["teacher_loaded"]
    assert runs["kd-cache"]["cache_fill_s"] > 0 and runs["mlm"]["cache_fill_s"] is None
    assert runs["mlm"]["teacher_batches"]["cached"] == 0
    assert "--distill_weight 0.9 --task_weight 0.1 --temperature 2" in runs["kd-cache"]["command"]
    table = (output_dir / "fidelity.md").read_text()
    # masked LM draws fresh masks; only the cached KD run replays the cache's one mask variant
    assert "| mlm | all | 0.5 min | 4 | fresh |" in table and "| kd-cache | all | 0.5 min | 4 | 1 |" in table
    for r in runs.values():  # evaluate.py's fidelity measures, against the teacher's side computed once
        assert -1 <= r["test"]["mutation_spearman"] <= 1 and 0 < r["test"]["cka"] <= 1
        assert r["test"]["knn_chance"] == pytest.approx(10 / 99) and 0 <= r["test"]["knn_overlap"] <= 1
    assert (output_dir / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_test_scores_match_evaluate_py(quick_run):
    """The replayed teacher logits and fixed masks give what evaluate.py computes from scratch."""
    output_dir, results = quick_run
    run = next(r for r in results["runs"] if r["variant"] == "kd-cache")
    report = evaluate.evaluate_checkpoint(
        run["checkpoint"],
        output_dir / "data" / "test.fasta",
        output_dir / "eval",
        teacher_model="antiberty",
        use_8bit=True,
        seed=fidelity.SEED,
        max_seq_len=fidelity.MAX_SEQ_LEN,
        speed_batches=0,
        device="cpu",
        mutation_proteins=fidelity.QUICK["mutation_proteins"],
        embedding_proteins=fidelity.QUICK["embedding_proteins"],
    )
    one_token = 1 / run["test"]["masked_tokens"]
    assert report["counts"]["masked_tokens"] == run["test"]["masked_tokens"]
    assert report["metrics"]["student"]["masked_acc"] == pytest.approx(run["test"]["masked_acc"], abs=one_token)
    assert report["metrics"]["teacher"]["masked_acc"] == pytest.approx(run["test"]["teacher_masked_acc"], abs=one_token)
    assert report["metrics"]["agreement"] == pytest.approx(run["test"]["agreement"], abs=one_token)
    mutations, reps = report["fidelity"]["mutation_effects"]["student"], report["fidelity"]["representations"]
    assert mutations["spearman"] == pytest.approx(run["test"]["mutation_spearman"], abs=1e-6)
    assert mutations["spearman_within_position_mean"] == pytest.approx(
        run["test"]["mutation_spearman_within_position"], abs=1e-6
    )
    assert reps["cka"] == pytest.approx(run["test"]["cka"], abs=1e-6)
    assert reps["knn_overlap"] == pytest.approx(run["test"]["knn_overlap"], abs=1e-6)


@pytest.mark.slow
def test_runs_already_recorded_are_skipped(quick_run, capsys):
    output_dir, results = quick_run
    fidelity.main(["--quick", "--budgets", "0.5", "--max_steps", str(STEPS), "--output_dir", str(output_dir)])
    assert "every requested run is in fidelity.json already" in capsys.readouterr().out
    assert json.loads((output_dir / "fidelity.json").read_text())["runs"] == results["runs"]


@pytest.mark.slow
def test_step_budgets_run_side_by_side_and_join_the_results(quick_run):
    output_dir, _ = quick_run
    fidelity.main(
        ["--quick", "--budgets", "3steps", "--jobs", "2", "--max_steps", str(STEPS), "--output_dir", str(output_dir)]
    )
    runs = json.loads((output_dir / "fidelity.json").read_text())["runs"]
    stepped = {r["variant"]: r for r in runs if r["budget_steps"] == 3}
    assert sorted(stepped) == ["kd-cache", "mlm"] and len(runs) == 4
    for r in stepped.values():
        assert r["steps"] == 3 and r["threads"] == max(1, os.cpu_count() // 2) and r["process_cpu_s"] is None
        assert "--max_steps 3" in r["command"] and "--max_time" not in r["command"]
        lrs = [
            json.loads(line)["lr"]
            for line in open(Path(r["checkpoint"]).parent / "metrics.jsonl")
            if json.loads(line)["split"] == "train"
        ]
        assert lrs[-1] == 0.0  # the step schedule decays to 0 at the last step
    assert "| mlm | all | 3 steps | 3 |" in (output_dir / "fidelity.md").read_text()


@pytest.mark.slow
def test_checkpoints_along_a_run_are_kept_and_scored(quick_run):
    output_dir, _ = quick_run
    argv = ["--quick", "--variants", "kd-cache", "--budgets", "4steps", "--score_steps", "2"]
    fidelity.main([*argv, "--max_steps", str(STEPS), "--output_dir", str(output_dir)])
    runs = json.loads((output_dir / "fidelity.json").read_text())["runs"]
    run = next(r for r in runs if r["variant"] == "kd-cache" and r["budget_steps"] == 4)
    assert "--save_every 2 --keep_last 0" in run["command"]
    assert [a["step"] for a in run["along"]] == [2, 4] and run["along"][-1] == {"step": 4, **run["test"]}
    # the step-2 scores are checkpoint-2's own, not the final ones again
    assert run["along"][0]["kl"] != run["along"][1]["kl"]
    assert run["along"][0]["masked_tokens"] == run["test"]["masked_tokens"]


@pytest.mark.slow
def test_results_made_otherwise_are_refused(quick_run):
    output_dir, _ = quick_run
    with pytest.raises(UserError, match="other settings"):
        fidelity.main(
            [
                "--quick",
                "--budgets",
                "0.5",
                "--max_steps",
                str(STEPS),
                "--learning_rate",
                "5e-4",
                "--output_dir",
                str(output_dir),
            ]
        )


@pytest.mark.slow  # the teacher on 100 test chains, two 3-step masked-LM runs
def test_training_set_sizes_share_the_test_split_and_draw_the_regime_map(tmp_path):
    out = tmp_path / "out"
    fidelity.main(
        ["--quick", "--variants", "mlm", "--budgets", "3steps", "--train_sizes", "64,128", "--output_dir", str(out)]
    )
    runs = json.loads((out / "fidelity.json").read_text())["runs"]
    assert sorted(r["train_size"] for r in runs) == [64, 128] and all(r["steps"] == 3 for r in runs)
    small, large, full = (data.read_fasta(out / folder / "train.fasta") for folder in ("data-n64", "data-n128", "data"))
    assert [p.id for p in small] == [p.id for p in large][:64]  # a smaller set is part of every larger one
    assert {p.id for p in large} <= {p.id for p in full} and [p.id for p in large] != [p.id for p in full][:128]
    for split in ("val.fasta", "test.fasta"):
        assert (out / "data-n64" / split).read_bytes() == (out / "data" / split).read_bytes()
    assert any(f"--data_path {out / 'data-n64'} " in r["command"] for r in runs)
    assert "| mlm | 64 | 3 steps | 3 |" in (out / "fidelity.md").read_text()
    assert (out / "fidelity_regimes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_fasta_is_split_a_tenth_each_up_to_1000_test_and_500_validation_chains(tmp_path):
    rng = random.Random(0)
    chains = [data.Protein(f"c{i}", "", "".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=30))) for i in range(12_000)]
    data.write_fasta(tmp_path / "large.fasta", chains)
    large = fidelity_runs.prepare_data(tmp_path / "large", tmp_path / "large.fasta", quick=False)
    assert (large["train"], large["val"], large["test"]) == (10_500, 500, 1_000)
    assert large["source"] == str(tmp_path / "large.fasta") and large["note"] == "12,000-chain antibody set"
    shipped = fidelity_runs.prepare_data(tmp_path / "shipped", data.SHIPPED_ANTIBODIES, quick=False)
    assert (shipped["train"], shipped["val"], shipped["test"], shipped["note"]) == (
        800,
        100,
        100,
        "shipped 1,000-chain sample",
    )
    args = fidelity.build_parser().parse_args(["--fasta", "data/antibody_sample.fasta", "--output_dir", str(tmp_path)])
    assert fidelity.resolve_args(args).fasta == data.SHIPPED_ANTIBODIES  # a relative --fasta is from the repository


def test_budgets_are_minutes_or_steps():
    ten, steps = fidelity.Budget.parse("10"), fidelity.Budget.parse(" 800steps")
    assert (ten.label, ten.flags) == ("10 min", ["--max_time", "10"])
    assert (steps.label, steps.flags, steps.slug) == ("800 steps", ["--max_steps", "800"], "800steps")
    assert fidelity.Budget.of({"budget_min": 10.0}) == ten  # records written before step budgets existed
    assert fidelity.Budget.of({"budget_min": None, "budget_steps": 800}) == steps
    assert sorted([steps, fidelity.Budget.parse("30"), ten], key=fidelity.Budget.sort_key) == [
        ten,
        fidelity.Budget.parse("30"),
        steps,
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "kd,nope"], "unknown nope"),
        (["--budgets", "ten"], "separated by commas"),
        (["--budgets", "0"], "positive"),
        (["--budgets", "0steps"], "positive"),
        (["--budgets", "10,800steps", "--jobs", "2"], "one at a time"),
        (["--train_sizes", "ten"], "chain counts"),
        (["--train_sizes", "8,all"], "at least --batch_size"),
    ],
)
def test_bad_arguments_are_user_errors(argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        fidelity.resolve_args(fidelity.build_parser().parse_args([*argv, "--output_dir", str(tmp_path)]))


@pytest.mark.parametrize("name", list(fidelity.VARIANTS))
def test_every_variant_is_a_valid_distill_command(name, tmp_path):
    """Each variant's command passes distill.py's checks, asks for the loss it is named for and
    reads a cache exactly when it is meant to."""
    import distill

    variant = fidelity.VARIANTS[name]
    args = fidelity.resolve_args(fidelity.build_parser().parse_args(["--output_dir", str(tmp_path)]))
    cache = tmp_path / "cache" if variant.cache else None
    command = fidelity_runs.distill_command(
        variant, fidelity.Budget.parse("10"), tmp_path / "run", cache, args, tmp_path / "data"
    )
    parsed = distill.build_parser().parse_args(command[2:])
    distill.validate_args(parsed)
    assert parsed.max_time == 10 and parsed.teacher_model == "antiberty" and parsed.use_8bit
    assert (parsed.teacher_cache is not None) == (variant.cache is not None)
    assert distill.teacher_in_loss(parsed) == variant.teacher_in_loss == (not name.startswith("mlm"))
    expected = {"t1": 1.0, "t4": 4.0}.get(name.rsplit("-", 1)[-1], 2.0)
    if variant.teacher_in_loss:
        assert parsed.temperature == expected
        assert (parsed.distill_weight, parsed.task_weight) == ((0.5, 0.5) if name.endswith("w0.5") else (0.9, 0.1))
    assert parsed.distill_positions == ("all" if name.endswith("-all") else "masked")
    assert (parsed.hidden_weight > 0) == (name == "kd-hidden")


def test_the_kd_variants_measure_distill_defaults():
    import distill

    defaults = distill.build_parser().parse_args(["--data_path", "x"])
    kd = dict(zip(student_runs.KD[::2], student_runs.KD[1::2]))
    assert (defaults.distill_weight, defaults.task_weight, defaults.temperature) == (
        float(kd["--distill_weight"]),
        float(kd["--task_weight"]),
        float(kd["--temperature"]),
    )
