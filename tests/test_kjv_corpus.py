"""scripts/kjv_corpus.py: the second corpus of the sweep (twelve KJV books, a verse per document)."""
import json
import shutil

import pytest

from tests.scripts import load_script

kjv = load_script("kjv_corpus")

_OUTPUT = """Ruth1:1 Now it came to pass in the days when the judges ruled, that there was a famine.
Ruth1:2 And the name of the man was Elimelech: and the name of his wife Naomi.

Ruth4:22 And Obed begat Jesse, and Jesse begat David.
"""


def test_verses_are_parsed_without_their_references():
    verses = kjv.parse_verses(_OUTPUT, "Ruth")
    assert verses == [
        "Now it came to pass in the days when the judges ruled, that there was a famine.",
        "And the name of the man was Elimelech: and the name of his wife Naomi.",
        "And Obed begat Jesse, and Jesse begat David.",
    ]


def test_a_line_that_is_not_a_verse_or_a_second_book_fails_loudly():
    with pytest.raises(ValueError, match=r"line 2 .*'Ruth'.*not a verse"):
        kjv.parse_verses("Ruth1:1 In the days.\nRuth chapter 2\n", "Ruth")
    # "Song of Solomon" unquoted is read by the program as three books: caught, not merged
    with pytest.raises(ValueError, match=r"mixes books \['Obad', 'SSol'\]"):
        kjv.parse_verses("SSol1:1 The song of songs.\nObad1:1 The vision of Obadiah.\n", "Song of Solomon")


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv package is not installed")
def test_the_corpus_has_every_verse_of_the_twelve_books(tmp_path):
    out = tmp_path / "kjv.jsonl"
    assert kjv.main([str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    counts = {book: sum(row["task"] == book for row in rows) for book in kjv.BOOKS}
    assert counts == kjv.BOOKS and len(rows) == 1104
    assert rows[0]["text"].startswith("The words of the Preacher")
    assert kjv.main([str(out)]) == 2  # an existing file is not overwritten
