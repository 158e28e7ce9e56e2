"""Write a second multi-task corpus, twelve books of the King James Bible, as a ``.jsonl`` file.

Each book is a task and each verse a document (``{"task": "Ruth", "text": "..."}``): twelve
books of 21 to 222 verses, two or more from each kind of writing (history, poetry and wisdom,
prophets, letters), so that the tasks are related but not alike and range from thin to rich,
as the Shakespeare characters of the ``cpu`` sweep do. The verses are short (median about 30
tokens), like the speeches.

The text comes from Debian's ``bible-kjv`` package (the ``bible`` program and its data file,
package ``bible-kjv-text``): ``apt-get install bible-kjv``. The KJV text is out of copyright
(1611; Debian's copyright file: "The copyright for the King James Version text of the Bible is
expired"); in the United Kingdom the Crown's letters patent still govern printing it. The
program is GPL-2+, and only its output is used here, not its code.

Use it with the sweep (docs/reproduction.md, "A second corpus")::

    python scripts/kjv_corpus.py kjv.jsonl
    bora sweep --config cpu --data kjv.jsonl --out sweeps/kjv
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

#: The books (tasks), richest first, with the verse counts of the KJV (checked when written).
BOOKS = {
    "Ecclesiastes": 222, "Esther": 167, "Lamentations": 154, "Song of Solomon": 117, "James": 108,
    "Ruth": 85, "Joel": 73, "Jonah": 48, "Titus": 46, "Haggai": 38, "Philemon": 25, "Obadiah": 21,
}

#: How the ``bible`` program must be asked for a book whose name has spaces (it would read
#: "Song of Solomon" as three verse specifications).
_SPEC = {"Song of Solomon": "SSol"}

#: A verse line of ``bible -f``: an abbreviated book, chapter:verse, a space, the text.
_VERSE = re.compile(r"^(?P<book>\S+?)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.+)$")


def parse_verses(output: str, book: str) -> list[str]:
    """The verses of one book from the text ``bible -f -l100000 "<book>1:1-99:999"`` prints.

    Raises
    ------
    ValueError
        When a non-empty line is not a verse, or the verses come from more than one book, so
        that a changed output format or a misread book name fails loudly.
    """
    verses, seen = [], set()
    for number, line in enumerate(output.splitlines(), start=1):
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None:
            raise ValueError(f"line {number} of the bible program's output for {book!r} is not a verse: {line!r}")
        seen.add(match["book"])
        verses.append(match["text"].strip())
    if len(seen) > 1:
        raise ValueError(f"the bible program's output for {book!r} mixes books {sorted(seen)}.")
    return verses


def read_book(book: str, program: str = "bible") -> list[str]:
    """Every verse of ``book`` as printed by Debian's ``bible`` program."""
    done = subprocess.run([program, "-f", "-l100000", f"{_SPEC.get(book, book)}1:1-99:999"],
                          capture_output=True, text=True, check=True)
    return parse_verses(done.stdout, book)


def write_corpus(path: Path, books: dict[str, int] = BOOKS, program: str = "bible") -> int:
    """Write ``{"task": book, "text": verse}`` lines to ``path``; returns the number of verses.

    Raises
    ------
    ValueError
        When a book's verse count differs from ``books`` (another edition or a broken install).
    """
    rows = []
    for book, expected in books.items():
        verses = read_book(book, program)
        if len(verses) != expected:
            raise ValueError(f"{book}: the bible program gave {len(verses)} verses, expected {expected}.")
        rows += [{"task": book, "text": verse} for verse in verses]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    if shutil.which("bible") is None:
        print("the `bible` program is missing: install Debian's bible-kjv package "
              "(apt-get install bible-kjv), then run this again.", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"{args.out} exists; give another path or delete it first.", file=sys.stderr)
        return 2
    n = write_corpus(args.out)
    print(f"wrote {n} verses of {len(BOOKS)} books to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
