"""Rebuild the shipped sample in data/ from the full sets in ../shared/data (see data/README.md).

Kept for provenance: users do not need to run it. Deterministic (fixed seeds).
"""
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "shared" / "data"


def read_records(path):
    header, records = None, []
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith(">"):
            header = line
        elif header is not None:
            records.append((header, line))
            header = None
    return records


def write_records(path, records):
    with open(path, "w") as f:
        for header, seq in records:
            f.write(f"{header}\n{seq}\n")


def main():
    uniprot = read_records(SOURCE / "uniprot_sample.fasta")
    rng = random.Random(20261129)
    chosen = sorted(rng.sample(range(len(uniprot)), 2000))
    write_records(HERE / "uniprot_sample.fasta", [uniprot[i] for i in chosen])

    antibodies = read_records(SOURCE / "antibody_sample.fasta")
    by_cell = {}
    for header, seq in antibodies:
        barcode = re.search(r"_chain_(\S+?)_contig", header).group(1)
        by_cell.setdefault(barcode, []).append((header, seq))
    paired = sorted(b for b, chains in by_cell.items() if len(chains) == 2)
    cells = sorted(random.Random(20261129).sample(paired, 500))
    write_records(HERE / "antibody_sample.fasta", [rec for b in cells for rec in by_cell[b]])


if __name__ == "__main__":
    main()
