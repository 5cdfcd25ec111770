"""Offline test fixtures: a tiny ChatML tokenizer and a tiny random Llama, built in memory in milliseconds.

Nothing here touches the network or the asset cache, so unit tests run anywhere. The tokenizer is a byte-level
BPE (any text encodes and decodes back exactly) trained on a fixed corpus, with ChatML special tokens and a
ChatML chat template, i.e. the same conventions as SmolLM2-Instruct.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "system user assistant",
    "You are a helpful assistant.",
    "How do I bake bread? Mix flour, water, salt and yeast, then knead and bake.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse.",
    "I cannot help with that request.",
    "Sure, here is a short answer to your question.",
    "The quick brown fox jumps over the lazy dog.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh ChatML tokenizer: eos ``<|im_end|>``, pad ``<|pad|>``, byte-level BPE with 400 ids."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        additional_special_tokens=[IM_START],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer: PreTrainedTokenizerFast | None = None, *, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A random LlamaForCausalLM (hidden 32, ``layers`` blocks) sized to ``tokenizer``; float32, eval mode."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # a wider init than the default 0.02 makes the random logits peaked, so greedy argmax is not a near-tie
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
