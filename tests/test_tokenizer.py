"""Tests of t5jax.tokenizer: T5 conventions and id parity with transformers' tokenizers."""

import os

import pytest
import sentencepiece as spm

from t5jax import tokenizer as tokenizer_lib
from t5jax.tokenizer import (
  ByteTokenizer,
  SentencePieceTokenizer,
  load_tokenizer,
  train_sentencepiece,
)

CORPUS = [
  f"the quick brown fox {i} jumps over the lazy dog, number {i * 7}; café naïve résumé"
  for i in range(200)
] + ["add: 17 + 25", "reverse: a b c d", "sort: 9 3 7 1", "number to words: forty two", "<x_y>"]

# Texts whose characters are all in CORPUS (transformers' Unigram backend has no byte fallback).
PARITY_TEXTS = [
  "the quick fox",
  "  hello   world  ",
  "x<extra_id_0>y",
  "a <extra_id_3> b</s>c",
  "café 123",
  "a\tb\nc",
  "<extra_id_9>",
  "",
  " ",
  "a <pad> b <unk>",
  "the<extra_id_1> <extra_id_2>  dog ",
  "<extra_id_10> fox",  # beyond extra_ids=10: plain text
  "sort: 9 3 7 1</s>",
  "<extra_id_5><extra_id_4>",
]
EXTRA_IDS = 10


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory):
  """Two tiny models: with byte fallback (our default) and without (transformers' backend)."""
  dirs = {}
  for byte_fallback, size in ((True, 400), (False, 120)):
    d = str(tmp_path_factory.mktemp(f"spm_bf{int(byte_fallback)}"))
    train_sentencepiece(CORPUS, size, d, extra_ids=EXTRA_IDS, byte_fallback=byte_fallback)
    dirs[byte_fallback] = d
  return dirs


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_ids_equal_transformers_t5_tokenizer(spm_dirs, byte_fallback):
  from transformers import T5Tokenizer

  tok = load_tokenizer(spm_dirs[byte_fallback])
  # In transformers 5.x `T5Tokenizer(vocab_file=...)` ignores the file and builds a placeholder
  # vocabulary; `from_pretrained` on the folder converts spiece.model for real.
  hf = T5Tokenizer.from_pretrained(spm_dirs[byte_fallback], extra_ids=EXTRA_IDS)
  assert len(hf) == tok.vocab_size > 100
  for i in range(EXTRA_IDS):
    assert hf.convert_tokens_to_ids(f"<extra_id_{i}>") == tok.sentinel_id(i)
  for text in PARITY_TEXTS:
    assert tok.encode(text) == hf(text).input_ids, text
    ids = tok.encode(text)
    assert tok.decode(ids) == hf.decode(ids[: ids.index(1)], skip_special_tokens=True), text


def test_plain_text_is_sentencepiece_plus_eos(spm_dirs):
  tok = load_tokenizer(spm_dirs[True])
  sp = spm.SentencePieceProcessor(model_file=os.path.join(spm_dirs[True], "spiece.model"))
  for text in ["the lazy dog", "ÿ日本 unseen chars", "  spaces  "]:
    assert tok.encode(text) == sp.encode(text) + [1]
  # Byte fallback round-trips characters missing from the vocabulary.
  assert tok.decode(tok.encode("ÿ日本 fox")) == "ÿ日本 fox"


def test_sentinels_and_sizes(spm_dirs):
  tok = load_tokenizer(spm_dirs[True])
  base = tok.sp.get_piece_size()
  assert tok.vocab_size == base + EXTRA_IDS
  assert tok.sentinel_id(0) == base + EXTRA_IDS - 1 == tok.vocab_size - 1
  assert tok.sentinel_id(EXTRA_IDS - 1) == base
  assert (tok.eos_id, tok.pad_id) == (1, 0)
  with pytest.raises(ValueError, match="out of range"):
    tok.sentinel_id(EXTRA_IDS)
  assert tok.encode("<extra_id_0>") == [tok.sentinel_id(0), 1]


def test_decode_stops_at_eos_and_skips_specials(spm_dirs):
  tok = load_tokenizer(spm_dirs[True])
  ids = tok.encode("the quick fox")
  noisy = [0] + ids[:2] + [tok.sentinel_id(3), 0] + ids[2:] + [9999] + tok.encode("dog")
  assert tok.decode(noisy) == "the quick fox"
  shown = tok.decode(tok.encode("the <extra_id_1> fox"), keep_sentinels=True)
  assert shown == "the <extra_id_1> fox"


def test_t5_standard_extra_ids_layout(tmp_path):
  # With T5's 100 extra ids the first sentinel is spm_size + 99 (32099 for the real 32000 vocab).
  tok = train_sentencepiece(CORPUS, 340, str(tmp_path))
  assert tok.sentinel_id(0) == tok.base_size + 99
  assert os.listdir(tmp_path) == ["spiece.model"]
  assert load_tokenizer(str(tmp_path)).extra_ids == 100


def test_save_and_load(tmp_path, spm_dirs):
  tok = load_tokenizer(spm_dirs[True])
  path = tok.save(str(tmp_path / "copy"))
  assert path.endswith("spiece.model")
  again = load_tokenizer(str(tmp_path / "copy"))
  assert again.vocab_size == tok.vocab_size and again.encode("fox") == tok.encode("fox")
  # A folder with one differently named .model, and the .model path itself.
  os.makedirs(tmp_path / "other")
  os.rename(path, tmp_path / "other" / "custom.model")
  assert load_tokenizer(str(tmp_path / "other"), extra_ids=EXTRA_IDS).vocab_size == tok.vocab_size
  direct = load_tokenizer(str(tmp_path / "other" / "custom.model"), extra_ids=EXTRA_IDS)
  assert direct.encode("fox") == tok.encode("fox")
  # ByT5 writes a marker.
  ByteTokenizer().save(str(tmp_path / "byt5"))
  assert isinstance(load_tokenizer(str(tmp_path / "byt5")), ByteTokenizer)
  with pytest.raises(FileNotFoundError):
    load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(FileNotFoundError):
    load_tokenizer(str(tmp_path / "byt5" / "nothing"))


def test_train_sentencepiece_deterministic_and_errors():
  a = train_sentencepiece(CORPUS, 350, None)
  b = train_sentencepiece(CORPUS, 350, None)
  assert a._proto == b._proto
  assert isinstance(a, SentencePieceTokenizer)
  # A tiny text with a large vocabulary: the vocabulary is smaller, not an error.
  small = train_sentencepiece(["a b c", "b c a"], 5000, None)
  assert small.base_size < 5000
  assert small.decode(small.encode("a b")) == "a b"
  with pytest.raises(ValueError, match="below the minimum"):
    train_sentencepiece(CORPUS, 100, None)
  with pytest.raises(ValueError, match="no non-empty"):
    train_sentencepiece(["", "  "], 300, None)


def test_bad_special_layout_rejected():
  model = train_sentencepiece(CORPUS, 340, None)._proto
  import io

  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=60, minloglevel=2, num_threads=1
  )
  with pytest.raises(ValueError, match="pad=0 eos=1 unk=2"):
    SentencePieceTokenizer(out.getvalue())
  assert SentencePieceTokenizer(model).vocab_size > 0


def test_byt5_matches_transformers_on_text():
  from transformers import ByT5Tokenizer

  hf = ByT5Tokenizer()
  tok = load_tokenizer("byt5")
  assert tok.vocab_size == len(hf) == 384
  for text in ["hé", "a <pad> b", " x </s>  y", "ÿ日本", "", "tab\there", "<unk>!"]:
    assert tok.encode(text) == hf(text).input_ids, text
  assert tok.encode("hi") == [ord("h") + 3, ord("i") + 3, 1]


def test_byt5_sentinels_and_decode():
  tok = ByteTokenizer()
  # T5 rule: <extra_id_0> is the top id. (transformers 5.x's ByT5Tokenizer maps <extra_id_i> to
  # 259 + i instead; both use the same 125 ids above the bytes.)
  assert tok.sentinel_id(0) == 383 and tok.sentinel_id(124) == 259
  assert tok.encode("q<extra_id_0> z") == [ord("q") + 3, 383, ord(" ") + 3, ord("z") + 3, 1]
  ids = tok.encode("héllo") + tok.encode("ignored")
  assert tok.decode(ids) == "héllo"
  assert tok.decode([0, 107, 383, 107, 2]) == "hh"
  assert tok.decode([107, 383, 108], keep_sentinels=True) == "h<extra_id_0>i"
  assert tokenizer_lib.load_tokenizer("ByT5").extra_ids == 125
