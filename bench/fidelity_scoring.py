"""The fidelity benchmark's scoring: every final checkpoint on the test split, which no run trains
or validates on, with evaluate.py's statistics against the teacher's side computed once.

Masked accuracy, top-1 agreement with the teacher, KL(teacher || student) at T = 1 and perplexity
under fixed masks; zero-shot mutation effects (Spearman with the teacher's masked marginals,
pooled and within a position), linear CKA of the last hidden states and 10-NN overlap of mean
embeddings, at evaluate.py's sample sizes unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from architecture import load_student
from fidelity_variants import Budget
from pepemb import data, heldout
from pepemb.cli import UserError
from pepemb.data import MaskedBatches
from student_runs import MAX_SEQ_LEN, SEED, TEACHER

MUTATION_POSITIONS = heldout.MUTATION_POSITIONS  # sites per chain for mutation effects: evaluate.py's default


class TestSet:
    """The test split under fixed masks (evaluate.py's: the validation masks of its seed), with the
    teacher's logits computed once and replayed, so that every student is scored by
    heldout.masked_statistics on the same positions against the same teacher outputs; and the
    teacher's mutation scores on `mutation_proteins` chains and last hidden states on
    `embedding_proteins`."""

    def __init__(self, fasta: Path, *, device: str, batch_size: int, mutation_proteins: int, embedding_proteins: int):
        from pepemb.teacher import load_teacher  # transformers is heavy: only once there is data to score

        self.device = torch.device(device)
        teacher = load_teacher(TEACHER, device=self.device, use_8bit=True)
        self.tokenizer, self.teacher_backend = teacher.tokenizer, teacher.backend
        sequences = [p.sequence for p in data.read_fasta(fasta)]
        masking = data.Masking(max_seq_len=MAX_SEQ_LEN, mask_prob=0.15, seed=SEED, batch_size=batch_size)
        self.batches = MaskedBatches(sequences, self.tokenizer, masking, epoch=0, train=False)
        self.residues = heldout.residue_counts(self.batches.unmasked(), self.tokenizer)
        self._logits = {}
        for i in range(len(self.batches)):
            batch = {k: v.to(self.device) for k, v in self.batches[i].items()}
            self._logits[self._key(batch["input_ids"])] = teacher(batch["input_ids"], batch["attention_mask"])["logits"]
        self.sequences = len(sequences)
        # evaluate.py's fidelity measures at its defaults, the teacher's side computed once
        self.probe = heldout.MutationProbe(
            sequences,
            self.tokenizer,
            proteins=mutation_proteins,
            positions=MUTATION_POSITIONS,
            seed=SEED,
            max_seq_len=MAX_SEQ_LEN,
        )
        self.teacher_mutation_scores = self.probe.scores(teacher, self.device)
        chosen = [sequences[i] for i in heldout.sample_proteins(len(sequences), embedding_proteins, SEED)]
        self.unmasked = MaskedBatches(chosen, self.tokenizer, masking, epoch=0, train=False).unmasked()
        self.teacher_states = heldout.last_hidden_states(teacher, self.unmasked, self.device)
        self.baseline_mutations = self.probe.agreement(self.probe.baseline, self.teacher_mutation_scores)

    @staticmethod
    def _key(input_ids: torch.Tensor) -> bytes:
        return input_ids.cpu().numpy().tobytes()

    def __call__(self, input_ids, attention_mask) -> dict:
        """The teacher's interface, as masked_statistics calls it, for a test batch."""
        return {"logits": self._logits[self._key(input_ids)]}

    def score(self, model_path) -> dict:
        """A checkpoint's test measures against the teacher's."""
        student, tokenizer, _ = load_student(model_path, map_location=self.device)
        if tokenizer.vocab_hash != self.tokenizer.vocab_hash:
            raise UserError(f"{model_path}: the student's vocabulary is not the teacher's")
        stats = heldout.masked_statistics(student, self, self.batches, self.device)
        m = heldout.build_report(stats, self.residues, tokenizer, None)["metrics"]
        mutations = self.probe.agreement(self.probe.scores(student, self.device), self.teacher_mutation_scores)
        reps = heldout.representation_measures(
            heldout.last_hidden_states(student, self.unmasked, self.device), self.teacher_states, seed=SEED
        )
        return {
            "mutation_spearman": mutations["spearman"],
            "mutation_spearman_per_protein": mutations["spearman_per_protein_mean"],
            "mutation_spearman_within_position": mutations["spearman_within_position_mean"],
            "cka": reps["cka"],
            "knn_overlap": reps["knn_overlap"],
            "knn_chance": reps["knn_chance"],
            "masked_acc": m["student"]["masked_acc"],
            "agreement": m["agreement"],
            "kl": m["kl_teacher_student"],
            "perplexity": m["student"]["perplexity"],
            "teacher_masked_acc": m["teacher"]["masked_acc"],
            "teacher_perplexity": m["teacher"]["perplexity"],
            "baseline_masked_acc": m["baseline"]["masked_acc"],
            "masked_tokens": stats["n"],
        }


def score(record: dict, test_set: TestSet, steps_along: list[int] = ()) -> dict:
    """The record with its final checkpoint's scores on the test split, and in "along" those of
    its checkpoints at `steps_along` before the last."""
    if "error" in record:
        return record
    record = {**record, "test": test_set.score(record["checkpoint"])}
    folder = Path(record["checkpoint"]).parent
    along = [s for s in sorted(steps_along) if s < record["steps"] and (folder / f"checkpoint-{s}").is_dir()]
    if along:
        record["along"] = [{"step": s, **test_set.score(folder / f"checkpoint-{s}")} for s in along]
        record["along"].append({"step": record["steps"], **record["test"]})
    t = record["test"]
    print(
        f"  {record['variant']}, {Budget.of(record).label}, repeat {record.get('repeat', 1)}: {record['steps']} steps in "
        f"{record['training_s'] / 60:.1f} min: test masked acc {t['masked_acc']:.3f}, agreement {t['agreement']:.3f}, "
        f"KL {t['kl']:.3f}, perplexity {t['perplexity']:.2f}",
        flush=True,
    )
    return record
