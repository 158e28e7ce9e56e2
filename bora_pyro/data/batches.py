"""Padded batches of documents that mix tasks, and the collation that builds them.

Token layout of one document of length ``n`` in a batch of width ``L`` (``n <= L``)::

    position   0        1 .. s-1        s .. n-1                  n .. L-1
    input_ids  <start>  prompt tokens   text / completion tokens  pad
    labels     IGNORE   IGNORE          the token id (scored)     IGNORE
    attention  1        1               1                         0

``s`` is the document's *label start* (1 in text mode, ``1 + len(prompt tokens)`` in
prompt/completion mode) and ``IGNORE`` is :data:`IGNORE_INDEX`. Labels follow the Hugging Face
convention: aligned with ``input_ids``, shifted inside the causal LM, so the logits at position
``j - 1`` are scored against ``labels[j]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "Batch", "collate"]

#: Label value of positions that are not scored (the value ignored by torch's cross-entropy).
IGNORE_INDEX: int = -100


@dataclass
class Batch:
    """A padded batch of documents that may mix tasks.

    Attributes
    ----------
    input_ids : torch.LongTensor
        ``[B, L]`` token ids, right-padded with the corpus pad id; ``L`` is the length of the
        longest document in the batch.
    attention_mask : torch.LongTensor
        ``[B, L]``; 1 at real tokens, 0 at padding.
    labels : torch.LongTensor
        ``[B, L]``; the token id at scored positions, :data:`IGNORE_INDEX` elsewhere (padding,
        prompt tokens and the start token). Aligned with ``input_ids`` (the model shifts).
    task_ids : torch.LongTensor
        ``[B]`` task id of each row (index into :attr:`TaskCorpus.tasks`).
    doc_index : torch.LongTensor
        ``[B]`` index of each row's document within its split, in ``0 .. num_docs - 1``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor
    doc_index: torch.Tensor

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """Return a copy of the batch with every tensor moved to ``device``."""
        return Batch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def __len__(self) -> int:
        """Number of rows ``B``."""
        return int(self.input_ids.shape[0])

    @property
    def num_scored_tokens(self) -> int:
        """Number of scored positions (labels not equal to :data:`IGNORE_INDEX`)."""
        return int((self.labels != IGNORE_INDEX).sum())


def collate(
    documents: list[np.ndarray],
    label_starts: np.ndarray,
    task_ids: torch.Tensor,
    doc_index: np.ndarray,
    *,
    pad_token_id: int,
) -> Batch:
    """Right-pad ``B`` documents into one :class:`Batch` (dynamic padding).

    Parameters
    ----------
    documents : list of numpy.ndarray
        ``B`` token arrays, start token first, each of length >= 1.
    label_starts : numpy.ndarray
        ``[B]`` first scored position of each document, in ``1 .. len(document)``.
    task_ids : torch.LongTensor
        ``[B]`` task id of each document.
    doc_index : numpy.ndarray
        ``[B]`` index of each document within its split.
    pad_token_id : int
        Id written at padded positions of ``input_ids``.

    Returns
    -------
    Batch
        Of width ``L = max(len(d) for d in documents)``; row ``b`` holds ``documents[b]``, its
        labels are the tokens from ``label_starts[b]`` on and :data:`IGNORE_INDEX` elsewhere.
    """
    if not documents:
        raise ValueError("collate(): documents is empty; pass at least one document.")
    width = max(len(doc) for doc in documents)
    rows = len(documents)
    input_ids = np.full((rows, width), pad_token_id, dtype=np.int64)
    labels = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=np.int64)
    starts = np.asarray(label_starts).tolist()
    for row, (doc, start) in enumerate(zip(documents, starts, strict=True)):
        length = len(doc)
        input_ids[row, :length] = doc
        attention_mask[row, :length] = 1
        labels[row, start:length] = doc[start:]
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        labels=torch.from_numpy(labels),
        task_ids=task_ids,
        doc_index=torch.from_numpy(np.array(doc_index, dtype=np.int64).reshape(-1)),
    )
