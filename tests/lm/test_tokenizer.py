"""The offline LM's tokenizer: trained on the dataset's words; round trips; template/hint words never unk."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from userip.lm import OfflineLMConfig, TokenizerModel, build_dataset_tokenizer, build_tokenizer, unknown_words
from userip.lm.offline import tokenizer_texts
from userip.utils.config import ConfigError


def test_word_tokenizer_round_trips_dataset_words(toy_dataset, prompt_config):
    tokenizer = build_dataset_tokenizer(toy_dataset, prompt_config, OfflineLMConfig())
    for title in toy_dataset.items["title"]:
        ids = tokenizer(title, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == title.lower()
    # Every template and hint word is a vocabulary word, and every profile word is a single token.
    _, required = tokenizer_texts(toy_dataset, prompt_config)
    assert unknown_words(tokenizer, required) == []
    for word in ["sports", "books", "budget", "luxury"]:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def test_special_tokens_and_bos_like_llama(toy_dataset, prompt_config):
    tokenizer = build_dataset_tokenizer(toy_dataset, prompt_config, OfflineLMConfig())
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = tokenizer("budget sports ball")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 4
    assert tokenizer.decode(ids, skip_special_tokens=True) == "budget sports ball"


def test_required_words_survive_a_small_vocabulary():
    texts = ["red ball"] * 5 + ["blue ball"] * 3
    tokenizer = build_tokenizer(texts, vocab_size=6, required_texts=["This user's hobby is"])
    assert unknown_words(tokenizer, ["This user's hobby is"]) == []
    assert unknown_words(tokenizer, ["blue"]) == ["blue"]  # capped away, not required
    assert tokenizer.decode(tokenizer("red ball", add_special_tokens=False)["input_ids"]) == "red ball"


def test_bpe_tokenizer_never_unknown_and_round_trips():
    tokenizer = build_tokenizer(["deluxe camping tent", "cheap frying pan"], 300, model=TokenizerModel.BPE)
    ids = tokenizer("zebra tent", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "zebra tent"


def test_saved_tokenizer_reloads_with_autotokenizer(tmp_path, toy_dataset, prompt_config):
    tokenizer = build_dataset_tokenizer(toy_dataset, prompt_config, OfflineLMConfig())
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "This user's hobby is luxury kitchen kettle"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (reloaded.pad_token_id, reloaded.bos_token_id) == (tokenizer.pad_token_id, tokenizer.bos_token_id)


def test_bad_vocab_size_and_empty_corpus_are_clear_errors():
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tokenizer(["a b"], vocab_size=3)
    with pytest.raises(ConfigError, match="no text"):
        build_tokenizer(["", ""], vocab_size=100)
