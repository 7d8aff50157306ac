"""Tokenizers: a tiny character-level one built offline, or any Hugging Face tokenizer.

The character tokenizer lets the default run (a small model built from a config, the built-in
procedural tasks) work with no download. Its ids are fixed:

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4 "\\n"   5.. printable ASCII " " (32) to "~" (126)

so a checkpoint trained with it is tied to nothing but this file. Every other character encodes
as one ``<unk>``. It adds ``<bos>`` in front when called with ``add_special_tokens=True`` (as
Llama tokenizers do) and carries a minimal chat template::

    <bos>Q:{user}\\nA:{assistant}<eos>
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARS = ("\n",) + tuple(chr(c) for c in range(32, 127))

CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}A:{{ message['content'] }}{{ eos_token }}"
    "{% else %}Q:{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer described in the module docstring (vocabulary of 100)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    # A BPE model with no merges splits its input into single characters; fuse_unk=False keeps
    # one <unk> per unknown character, so token counts equal character counts.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The character tokenizer when ``path`` is None, else ``AutoTokenizer.from_pretrained(path)``.

    A loaded tokenizer without a pad token gets its EOS token as pad (the usual choice for causal
    LMs; padded positions are never targets, so the choice does not change the loss).
    """
    if path is None:
        return build_char_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
