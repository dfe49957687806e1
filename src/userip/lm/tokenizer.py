"""A small Hugging Face tokenizer trained on a dataset's own words, for the offline LM.

No tokenizer can be downloaded here, and a borrowed one (e.g. stories260K's, trained on children's stories)
splits product words into meaningless pieces. So the offline LM gets a tokenizer trained with the HF
``tokenizers`` library on the dataset's item titles, categories, brands, hint words and the prompt template's
words, wrapped as a ``PreTrainedTokenizerFast`` so that it saves and reloads with ``AutoTokenizer``.

Two models:

* ``word`` (default): one token per lower-cased word (``Whitespace`` pre-tokenizer: words and punctuation
  runs). Every profile word ("sports", "budget") is then one vocabulary entry, which makes soft tokens decode
  to readable nearest words (paper 3.8). Words outside the top ``vocab_size`` map to ``<unk>``, except the
  *required* words (template, categories, hint words), which are always added.
* ``bpe``: byte-level BPE (never produces ``<unk>``), for sources with open vocabularies such as reviews.

Like Llama tokenizers, it adds ``<s>`` (BOS) in front when ``add_special_tokens=True``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from userip.utils.config import ConfigError

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0..3 in this order


class TokenizerModel(enum.Enum):
    WORD = "word"
    BPE = "bpe"


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    required_texts: Sequence[str] = (),
    model: TokenizerModel | str = TokenizerModel.WORD,
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts`` (+ ``required_texts``) and wrap it for ``transformers``.

    ``vocab_size`` caps the trained vocabulary (special tokens included). For the word model, every word of
    ``required_texts`` is guaranteed to be in the vocabulary even beyond the cap, so the prompt template and
    the profile words never become ``<unk>``; the final size is ``len(tokenizer)``.
    """
    model = TokenizerModel(model) if not isinstance(model, TokenizerModel) else model
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"build_tokenizer: vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    corpus = [t for t in texts if t] + [t for t in required_texts if t]
    if not corpus:
        raise ConfigError("build_tokenizer: no text to train on (empty titles and template?)")

    if model is TokenizerModel.WORD:
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
        )
        tokenizer.train_from_iterator(corpus, trainer=trainer)
        tokenizer = _with_required_words(tokenizer, required_texts)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(corpus, trainer=trainer)

    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
    )


def _with_required_words(tokenizer: Tokenizer, required_texts: Sequence[str]) -> Tokenizer:
    """Append required words missing from a trained word-level vocabulary (new ids at the end).

    Rebuilding the ``WordLevel`` model keeps them ordinary vocabulary words. (``add_tokens`` would make them
    *added tokens*, which are matched before pre-tokenization, e.g. inside longer words.)
    """
    vocab = tokenizer.get_vocab()
    missing: list[str] = []
    for text in required_texts:
        normalized = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer else text
        for word, _span in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            if word not in vocab and word not in missing:
                missing.append(word)
    if not missing:
        return tokenizer
    for word in missing:
        vocab[word] = len(vocab)
    rebuilt = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    rebuilt.normalizer = tokenizer.normalizer
    rebuilt.pre_tokenizer = tokenizer.pre_tokenizer
    rebuilt.add_special_tokens(list(SPECIAL_TOKENS))
    return rebuilt


def unknown_words(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> list[str]:
    """Words of ``texts`` that the tokenizer maps to ``<unk>`` (for checks and error messages)."""
    unk = tokenizer.unk_token_id
    backend = tokenizer.backend_tokenizer
    out: list[str] = []
    for text in texts:
        encoding = backend.encode(text, add_special_tokens=False)
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            word = text[start:end]
            if token_id == unk and word not in out:
                out.append(word)
    return out
