"""Input pipeline: document sources, tokenizers, packing and the Grain pipeline."""

from moe_jax.data.pipeline import (BatchLoader, eval_rows, load_or_train_tokenizer, load_tokenizer, packer_counters,
                                   train_rows, validation_texts)
from moe_jax.data.sources import SOURCES, build_source, embedded_corpus_files, is_validation
from moe_jax.data.tokenizer import TOKENIZERS, BPETokenizer, ByteTokenizer, train_bpe
