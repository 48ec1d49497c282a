"""Tokenizers: the shared protocol, byte and BPE round trips, tokenizer.json save/load, errors."""

import numpy as np
import pytest
import tokenizers

from llmarch.data import BPETokenizer, ByteTokenizer, Tokenizer, default_documents, load_tokenizer

TEXTS = [
    "hello world",
    "héllo wörld — ünïcode ✓ 日本語 🙂",
    "",
    "  two  spaces\n\ttab\r\n",
    "a literal </s> and <s> and <pad> stay text",
]


@pytest.fixture(scope="module")
def bpe():
    # ~100 KB of Python's docs: enough for real merges, trained in well under a second.
    return BPETokenizer.train(default_documents()[:60], vocab_size=600)


def test_byte_tokenizer_protocol_and_round_trip():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids.dtype == np.int32 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
    assert tok.encode("ab").tolist() == [97, 98]
    with pytest.raises(ValueError, match="vocab_size=259"):
        tok.decode([259])


def test_bpe_protocol_round_trip_and_specials(bpe):
    assert isinstance(bpe, Tokenizer)
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)  # specials first, in a fixed order
    assert 300 < bpe.vocab_size <= 600
    for text in TEXTS:
        ids = bpe.encode(text, bos=True, eos=True)
        assert ids.dtype == np.int32 and ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id
        assert bpe.decode(ids) == text
    # Special-token strings in the text are text, never the special ids.
    ids = bpe.encode(TEXTS[-1])
    assert not np.isin(ids, [bpe.pad_id, bpe.bos_id, bpe.eos_id]).any()
    # Merges were learned: common English compresses below one token per byte.
    text = default_documents()[0]
    assert len(bpe.encode(text)) < 0.6 * len(text.encode())
    batch = bpe.encode_batch(TEXTS, bos=True, eos=True)
    for ids, text in zip(batch, TEXTS, strict=True):
        assert np.array_equal(ids, bpe.encode(text, bos=True, eos=True))
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.decode([bpe.vocab_size])


def test_bpe_save_load_identical(bpe, tmp_path):
    file = bpe.save(tmp_path / "tok")
    assert file == tmp_path / "tok" / "tokenizer.json" and file.is_file()
    for loaded in (
        BPETokenizer.load(file),
        BPETokenizer.load(tmp_path / "tok"),
        load_tokenizer(str(file)),
        load_tokenizer(tmp_path / "tok"),
    ):
        assert isinstance(loaded, BPETokenizer)
        assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (
            bpe.vocab_size,
            bpe.pad_id,
            bpe.bos_id,
            bpe.eos_id,
        )
        for text in TEXTS:
            assert np.array_equal(loaded.encode(text, eos=True), bpe.encode(text, eos=True))
    assert bpe.save(tmp_path / "named.json") == tmp_path / "named.json"


def test_bpe_file_loads_in_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    file = bpe.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(file), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    for text in TEXTS[:4]:  # transformers parses "<s>" in text as the special token; we do not
        ids = bpe.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids.tolist()
        assert hf.decode(ids.tolist()) == text


def test_load_foreign_tokenizer_json_by_special_names(tmp_path):
    # A GPT-2-style file made elsewhere: one special token serving as BOS, EOS and PAD.
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["some text to learn from"] * 5, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"bos_token='<s>'.*<\|endoftext\|>"):
        BPETokenizer.load(tmp_path)
    eot = "<|endoftext|>"
    loaded = load_tokenizer(tmp_path, bos_token=eot, eos_token=eot, pad_token=eot)
    assert loaded.bos_id == loaded.eos_id == loaded.pad_id == tok.token_to_id(eot)
    assert loaded.decode(loaded.encode("learn text", eos=True)) == "learn text"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 259"):
        BPETokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(TypeError, match="iterable of documents"):
        BPETokenizer.train("abc", vocab_size=300)
    with pytest.raises(ValueError, match="spec 'gpt9' is unknown.*'byte'"):
        load_tokenizer("gpt9")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without one
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
