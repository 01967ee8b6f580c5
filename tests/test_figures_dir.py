"""figures/ holds one file per figure: no two files are byte-identical copies."""

import hashlib
from collections import defaultdict
from pathlib import Path

FIGURES = Path(__file__).resolve().parent.parent / "figures"


def test_no_two_files_in_figures_are_identical():
    by_hash = defaultdict(list)
    for p in sorted(FIGURES.iterdir()):
        if p.is_file():
            by_hash[hashlib.sha256(p.read_bytes()).hexdigest()].append(p.name)
    copies = [names for names in by_hash.values() if len(names) > 1]
    assert not copies, f"identical files in figures/ (keep one name per figure): {copies}"
