"""A run's data: its documents loaded, cleaned (``TrainConfig.clean``), split, tokenized and packed,
and the source its training batches are read from (augmented per epoch with ``TrainConfig.augment``).

Cleaning runs on the whole corpus before the train/validation split, so no duplicate straddles
it; augmentation touches the training split only, never what the run is validated on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmarch.data import (
    AugmentedRows,
    CleanReport,
    PackedRows,
    clean_documents,
    load_documents,
    load_tokenizer,
    pack_documents,
    train_val_split,
)
from llmarch.data.augment_epochs import describe
from llmarch.train.config import TrainConfig


@dataclasses.dataclass
class RunData:
    train_rows: PackedRows  # the training split as written (cleaned, never augmented)
    val_rows: PackedRows
    train_source: PackedRows | AugmentedRows  # what the training batches read
    clean_report: CleanReport | None  # None: no cleaning configured

    def report(self) -> dict[str, Any]:
        """The contents of the run's ``data_report.json``."""
        source = self.train_source
        return {
            "clean": None if self.clean_report is None else self.clean_report.to_dict(),
            "augment": describe(source.cfg) if isinstance(source, AugmentedRows) else None,
            "train_tokens": self.train_rows.num_tokens,
            "train_documents": self.train_rows.num_documents,
            "train_rows_per_epoch": len(self.train_rows),
            "val_tokens": self.val_rows.num_tokens,
            "val_documents": self.val_rows.num_documents,
        }

    def lines(self) -> list[str]:
        """What the trainer prints about the data before it trains."""
        lines = [] if self.clean_report is None else self.clean_report.lines()
        if isinstance(self.train_source, AugmentedRows):
            cfg = self.train_source.cfg
            lines.append(
                f"augmenting each epoch: ops {','.join(cfg.ops)}, alpha {cfg.alpha}, p_delete "
                f"{cfg.p_delete}, a document with probability {cfg.prob}, by {cfg.unit}"
            )
        return lines


def load_data(cfg: TrainConfig, *, augment: bool = True) -> RunData:
    """The run's data (see the module docstring); ``augment=False`` leaves ``cfg.augment`` out (the
    readers of a run's validation split need neither it nor WordNet).

    Raises:
      ValueError: a corpus that cannot be read, or that cleaning empties; a tokenizer that does
        not fit the model.
      FileNotFoundError: the corpus, or the WordNet database that ``sr``/``ri`` augmentation needs.
    """
    model_cfg = cfg.model_config()
    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.data_format == "chat":  # conversations, the loss on the assistant's tokens only
        from llmarch.data.chat import load_chat_rows

        train_rows, val_rows = load_chat_rows(
            cfg.data,
            tokenizer,
            seq_len=cfg.seq_len,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            template=cfg.chat_template,
            tokenizer_spec=cfg.tokenizer,
            model_vocab_size=model_cfg.vocab_size,
        )
        return RunData(train_rows, val_rows, train_rows, None)
    documents = load_documents(cfg.data, text_field=cfg.text_field)
    report = None
    if cfg.clean is not None:
        documents, report = clean_documents(documents, cfg.clean)
    train_docs, val_docs = train_val_split(documents, cfg.val_fraction, seed=cfg.seed)
    pack = dict(seq_len=cfg.seq_len, model_vocab_size=model_cfg.vocab_size)
    val_rows = pack_documents(val_docs, tokenizer, **pack)
    if cfg.augment is not None and augment:
        source = AugmentedRows(train_docs, tokenizer, cfg.augment, **pack)
        return RunData(source.base, val_rows, source, report)
    train_rows = pack_documents(train_docs, tokenizer, **pack)
    return RunData(train_rows, val_rows, train_rows, report)


def load_rows(cfg: TrainConfig) -> tuple[PackedRows, PackedRows]:
    """The run's training and validation rows (cleaned, not augmented)."""
    data = load_data(cfg, augment=False)
    return data.train_rows, data.val_rows
