"""Build a tiny random-weight Qwen2.5-VL checkpoint offline.

The tests and `serve --demo` load it through exactly the code path the real ShizhenGPT checkpoint takes
(`AutoProcessor` + `Qwen2_5_VLForConditionalGeneration.from_pretrained`), so no hub access is ever needed to
exercise the server end to end. Its weights are random: it emits gibberish, quickly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from .store import RANDOM_MODEL_MARKER

# Qwen2's added tokens, in Qwen's order (their ids follow the BPE vocabulary, as in the real tokenizer).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template Qwen2-VL / Qwen2.5-VL checkpoints ship (system prompt injected when none is given).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TRAINING_TEXT = (
    "舌诊是中医望诊的重要内容。舌质淡红，舌苔薄白，为正常舌象。舌红苔黄，多主热证；舌淡苔白，多主寒证。"
    "舌体胖大有齿痕，多属脾虚湿盛。舌苔厚腻，多为痰湿内阻。舌质紫暗或有瘀斑，多为血瘀。"
    "请从中医角度解读这张舌苔。气血阴阳，脏腑经络，辨证论治，望闻问切，四诊合参。"
    "Traditional Chinese Medicine reads the tongue body and its coating: a pale red tongue with a thin white "
    "coating is normal; a red tongue with a yellow coating suggests heat; a pale tongue suggests cold or "
    "deficiency. The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?()[]{}<>-_=+*/\\'\"\n"
)

TINY_TEXT_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
)
TINY_VISION_SIZES = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,  # must equal the text hidden size
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
)


def build_tokenizer(pad_vocab_to: int | None = None) -> Qwen2Tokenizer:
    """A byte-level BPE trained on a few KB of TCM text, with Qwen's special tokens appended in Qwen's order.

    `pad_vocab_to=151643` pads the vocabulary with filler tokens so the special tokens land on Qwen's real ids
    (151643, ...): what the benchmarks need to drive a real-size model.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
    vocab = model_state["vocab"]
    vocab |= {f"Ġfiller{i}": i for i in range(len(vocab), pad_vocab_to or 0)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def build_tiny_checkpoint(target: Path, seed: int = 0) -> Path:
    """Write processor files and random weights to `target`; returns it. Deterministic for a given seed."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(target)

    config = Qwen2_5_VLConfig(
        text_config=dict(
            TINY_TEXT_SIZES,
            vocab_size=len(tokenizer),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=TINY_VISION_SIZES,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(target)
    (target / RANDOM_MODEL_MARKER).write_text("random weights, built offline for tests and demos\n")
    return target
