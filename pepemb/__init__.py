"""PepEmb distill's library: everything the commands at the repository root share.

The student itself is `architecture.py` at the root (torch and the standard library only, so it
can be copied out alone); this package builds everything around it. Data: `data` (FASTA, splits,
masking, batching). The teacher: `teacher` (any HuggingFace masked LM or AntiBERTy, frozen),
`teacher_cache` (its outputs on disk), `teacher_targets` (a batch's teacher outputs, live or
cached). Training: `losses`, `schedule`, `validation`, `checkpoints`, `distributed`, `monitoring`,
`signals`, `devices`. Using a student: `inference` (ids -> hidden states, long sequences
windowed), `variant_scores` (zero-shot mutation scores), `saliency` (Integrated Gradients and its
checks), `hf_export` (a native transformers ESM-2 model). Measuring it: `heldout` (masked-LM
statistics and fidelity probes on held-out proteins), `fidelity` (mutation-effect Spearman, CKA,
k-NN overlap as pure functions). Command-line plumbing: `options` (argument groups, the only
place that sees an argparse namespace), `cli` (one-line user errors), `progress`, `files`.
"""
