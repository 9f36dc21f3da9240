"""The engine's parts on their own: text release, stop strings, sampling rules, admission and memory planning."""

from __future__ import annotations


import torch
from conftest import tongue_photo
from transformers import AutoTokenizer

from shizhen.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from shizhen.engine.loader import load_model
from shizhen.engine.model_runner import ModelRunner
from shizhen.engine.prompt import ChatTurn, PromptBuilder, PromptInputs
from shizhen.engine import wire
from shizhen.engine.request import GenerationRequest
from shizhen.engine.sampling import BatchSampler, SamplingParams, SlotHistory
from shizhen.engine.allocation import BlockPool
from shizhen.engine.scheduler import Scheduler
from shizhen.engine.sequence import Sequence
from shizhen.engine.vision_attention import use_packed_vision_attention


def test_detokenizer_never_splits_a_character(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "舌红苔黄，脉数。Tongue 🙂 red"
    ids = tokenizer(text)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopStringMatcher(("</答>", "END"))
    assert matcher.feed("舌淡<") == ("舌淡", False)
    assert matcher.feed("/") == ("", False)
    assert matcher.feed("x") == ("</x", False)
    assert matcher.feed("苔白</答") == ("苔白", False)
    assert matcher.feed(">后面") == ("", True)
    other = StopStringMatcher(("END",))
    assert other.feed("the EN") == ("the ", False)
    assert other.flush() == "EN"


def _history(slot: int, params: SamplingParams, prompt: list[int], output: list[int] = ()) -> SlotHistory:
    return SlotHistory(slot, params, params.seed or 0, torch.tensor(prompt), list(output))


def _sample(steps: int = 1, logits=None, **params) -> list[int]:
    sampler = BatchSampler(slots=2, vocab_size=6, device=torch.device("cpu"))
    rows = sampler.admit([_history(1, SamplingParams(max_new_tokens=8, **params), [0, 1])])
    logits = logits if logits is not None else torch.tensor([5.0, 4.0, 3.0, 0.0, 0.0, 0.0])
    return [int(sampler.sample(logits[None], [1], rows)[0]) for _ in range(steps)]


def test_greedy_and_penalties():
    assert _sample(temperature=0) == [0]
    # repetition penalty covers prompt tokens (0, 1): 5/3 and 4/3 drop below 3
    assert _sample(temperature=0, repetition_penalty=3.0) == [2]
    assert _sample(4, temperature=0, frequency_penalty=2.0) == [0, 1, 0, 2]  # grows with each repeat
    assert _sample(4, temperature=0, presence_penalty=1.5) == [0, 1, 0, 0]  # once per token seen


def test_top_k_top_p_and_seed():
    logits = torch.tensor([2.0, 1.9, 1.8, -5.0, -5.0, -5.0])
    assert set(_sample(20, logits, temperature=1.0, top_k=1, seed=1)) == {0}
    assert set(_sample(50, logits, temperature=1.0, top_p=0.5, seed=2)) <= {0, 1}
    assert len(set(_sample(50, logits, temperature=1.0, seed=2))) == 3
    assert _sample(30, logits, temperature=1.0, seed=7) == _sample(30, logits, temperature=1.0, seed=7)
    assert _sample(30, logits, temperature=1.0, seed=7) != _sample(30, logits, temperature=1.0, seed=8)


def test_a_token_of_negligible_or_no_probability_is_never_drawn():
    """Over a real vocabulary's width, some noise value per step is the largest the hash gives; it must not pick a
    token the model (or a grammar's mask, -inf) rules out. 24 rows × 25 steps × 152k tokens."""
    vocab, slots = 152_064, 24
    sampler = BatchSampler(slots=slots, vocab_size=vocab, device=torch.device("cpu"))
    rows = sampler.admit([_history(slot, SamplingParams(max_new_tokens=64, temperature=1.0, seed=slot), [0])
                          for slot in range(slots)])
    logits = torch.full((slots, vocab), -1e4)
    logits[:, 7], logits[:, 8], logits[::2, 9] = 0.0, 0.0, float("-inf")  # 9: masked in half the rows
    drawn = {int(token) for _ in range(25) for token in sampler.sample(logits, list(range(slots)), rows)}
    assert drawn == {7, 8}


def test_rows_sample_independently_of_their_neighbours():
    """A seeded request draws the same tokens alone or beside other requests in the batch."""
    logits = torch.tensor([[1.0, 1.1, 0.9, 1.0, 1.2, 0.8]])
    alone = BatchSampler(slots=4, vocab_size=6, device=torch.device("cpu"))
    alone_rows = alone.admit([_history(2, SamplingParams(max_new_tokens=8, seed=11), [0])])
    crowded = BatchSampler(slots=4, vocab_size=6, device=torch.device("cpu"))
    crowded_rows = crowded.admit([_history(slot, SamplingParams(max_new_tokens=8, seed=11 if slot == 2 else slot,
                                                                top_p=0.9), [0]) for slot in range(4)])
    solo = [int(alone.sample(logits, [2], alone_rows)[0]) for _ in range(10)]
    together = [int(crowded.sample(logits.repeat(4, 1), [0, 1, 2, 3], crowded_rows)[2]) for _ in range(10)]
    assert solo == together


def test_a_slot_set_up_from_history_draws_what_the_uninterrupted_one_would():
    """A preempted sequence comes back in another slot with the tokens it produced: its penalties and its seeded
    noise pick up exactly where they were."""
    logits = torch.tensor([[1.0, 1.1, 0.9, 1.0, 1.2, 0.8]])
    params = SamplingParams(max_new_tokens=20, seed=5, temperature=1.0, frequency_penalty=0.3, repetition_penalty=1.2)
    whole = BatchSampler(slots=2, vocab_size=6, device=torch.device("cpu"))
    rows = whole.admit([_history(0, params, [3, 4])])
    uninterrupted = [int(whole.sample(logits, [0], rows)[0]) for _ in range(12)]
    resumed = BatchSampler(slots=2, vocab_size=6, device=torch.device("cpu"))
    rows = resumed.admit([_history(1, params, [3, 4], uninterrupted[:5])])
    assert [int(resumed.sample(logits, [1], rows)[0]) for _ in range(7)] == uninterrupted[5:]


IMAGE_TOKEN = 10**6


def _sequence(prompt_tokens: int, max_new_tokens: int = 16, first_token: int = 0,
              images: tuple[str, ...] = ()) -> Sequence:
    """A sequence whose prompt is token ids counting up from `first_token`; with `images`, its tokens 10-19,
    30-39, ... are those images' placeholders."""
    ids = torch.arange(first_token, first_token + prompt_tokens).view(1, -1)
    for index in range(len(images)):
        ids[0, 10 + 20 * index : 20 + 20 * index] = IMAGE_TOKEN
    prompt = PromptInputs(input_ids=ids, image_token_id=IMAGE_TOKEN if images else None, image_hashes=images)
    return Sequence(GenerationRequest("r", prompt, SamplingParams(max_new_tokens=max_new_tokens)), frozenset(), seed=0)


def _produce(sequence: Sequence, tokens: int) -> None:
    """`tokens` more collected tokens (the last one is fed by the next step)."""
    sequence.output_ids += [7] * tokens
    sequence.produced = sequence.sampled = len(sequence.output_ids)


def test_admission_waits_for_kv_blocks_as_well_as_slots():
    """A request is admitted with the blocks its prompt and first decode step fill, however large its max_tokens;
    one that does not fit waits, and so do the requests behind it, until running ones give blocks back. While
    others run, a watermark of free blocks stays for them to grow into. Block 0 (scratch) is never handed out."""
    scheduler = Scheduler(slots=4, blocks=1 + 5, prefill_token_budget=8192)  # 5 blocks of 64 positions
    for index, prompt_tokens in enumerate((100, 60, 200, 10)):
        scheduler.add(_sequence(prompt_tokens, max_new_tokens=4000, first_token=1000 * index))
    first = scheduler.prefill_chunks()
    assert [len(chunk.blocks) for chunk in first] == [2, 1]  # the third needs 4 and 1 more stays free
    assert scheduler.kv_usage == 3 / 5 and len(scheduler.waiting) == 2
    for chunk in first:
        scheduler.release(chunk.sequence.slot)
    second = scheduler.prefill_chunks()
    assert [len(chunk.blocks) for chunk in second] == [4] and len(scheduler.waiting) == 1
    assert 0 not in second[0].blocks


def test_a_long_prompt_is_prefilled_in_chunks_within_the_budget_and_others_share_the_step():
    scheduler = Scheduler(slots=4, blocks=1 + 20, prefill_token_budget=100)
    long, short = _sequence(250), _sequence(30, first_token=5000)
    scheduler.add(long)
    scheduler.add(short)
    steps = []
    while chunks := scheduler.prefill_chunks():
        steps.append([(chunk.sequence, chunk.start, chunk.end, chunk.final) for chunk in chunks])
        assert scheduler.decode_batch() == []  # none decodes before its prompt is prefilled
        scheduler.prefilled(chunks)
    assert steps == [[(long, 0, 100, False)], [(long, 100, 200, False)],
                     [(long, 200, 250, True), (short, 0, 30, True)]]
    assert scheduler.decode_batch() == [long, short]


def test_a_cached_prefix_is_taken_not_computed_and_only_full_blocks_are_shared():
    """A prompt that begins like an earlier one (its blocks written and released) gets the full blocks they
    share and prefills the rest; its last token is always computed (its logits are needed), and a block that
    holds different images is not shared although the token ids are the same."""
    scheduler = Scheduler(slots=4, blocks=1 + 20, prefill_token_budget=8192)
    first = _sequence(200, images=("photo-a",))
    scheduler.add(first)
    [first_chunk] = scheduler.prefill_chunks()
    scheduler.prefilled([first_chunk])
    scheduler.release(first.slot)  # its 3 full blocks stay cached

    def admitted(sequence):
        scheduler.add(sequence)
        [chunk] = scheduler.prefill_chunks()
        scheduler.prefilled([chunk])
        return chunk

    same_start = _sequence(150, images=("photo-a",))  # shares 150 tokens: 2 full blocks
    chunk = admitted(same_start)
    assert (chunk.start, chunk.end, same_start.cached_tokens) == (128, 150, 128)
    assert chunk.blocks[:2] == first_chunk.blocks[:2]
    exactly = _sequence(192, images=("photo-a",))  # all 3 blocks match, but the last token must be computed
    assert admitted(exactly).start == 128
    other_photo = _sequence(200, images=("photo-b",))  # same ids, another image in block 0
    assert admitted(other_photo).start == 0 and other_photo.cached_tokens == 0
    assert (scheduler.prefix_queried_tokens, scheduler.prefix_hit_tokens) == (200 + 150 + 192 + 200, 256)


def test_cached_blocks_are_evicted_least_recently_used_and_only_when_needed():
    pool = BlockPool(range(1, 5))
    a, b = pool.allocate(2), pool.allocate(1)
    pool.register(a[0], b"a0")
    pool.register(a[1], b"a1")
    pool.register(b[0], b"b0")
    pool.release(a)
    pool.release(b)
    assert pool.free == 4 and pool.cached([b"a0", b"a1"]) == a and pool.cached([b"b0"]) == b
    assert pool.allocate(1) == [4]  # the never-used block first
    pool.take(pool.cached([b"b0"]))  # held again: b is now the most recent use, and cannot be evicted
    assert pool.allocate(1) == [a[1]]  # a's last block goes before its first
    assert pool.cached([b"a0", b"a1"]) == [a[0]]
    assert pool.allocate(2) is None and pool.allocate(1) == [a[0]] and pool.cached([b"a0"]) == []
    assert pool.cached([b"b0"]) == b and pool.free == 0


def test_sequences_grow_block_by_block_and_the_newest_is_preempted_when_none_is_left():
    """The preempted sequence's written blocks stay cached while others can do without them: when it comes back
    it recomputes only what is not."""
    scheduler = Scheduler(slots=3, blocks=1 + 4, prefill_token_budget=8192)
    scheduler.add(_sequence(60))
    scheduler.add(_sequence(60, first_token=500))
    chunks = scheduler.prefill_chunks()
    older, newer = (chunk.sequence for chunk in chunks)  # running from here
    scheduler.prefilled(chunks)
    assert scheduler.outgrowing() == []  # the next step writes position 60: block 1 of 1
    _produce(older, 5)
    _produce(newer, 5)
    assert scheduler.outgrowing() == [older, newer]  # both write position 64 next
    assert scheduler.grow(older) == (1, 3) and scheduler.grow(newer) == (1, 4)
    _produce(older, 64)
    assert scheduler.outgrowing() == [older] and scheduler.grow(older) is None  # all 4 blocks are held
    assert scheduler.preempt_newest() is newer
    assert list(scheduler.running.values()) == [older] and list(scheduler.waiting) == [newer]
    assert scheduler.grow(older) == (2, 4)  # the block the newer one wrote no full block into, not its cached one

    assert scheduler.prefill_chunks() == []  # the newer one's 65 tokens need block 2 (cached) and one more
    scheduler.release(older.slot)
    [chunk] = scheduler.prefill_chunks()
    assert chunk.sequence is newer and chunk.blocks[0] == 2 and len(chunk.blocks) == 2
    assert (chunk.start, chunk.end) == (64, 65)  # the cached block holds its first 64 tokens
    scheduler.prefilled([chunk])
    assert newer.cache_len == 65


def test_a_request_crosses_to_the_engine_process_intact(tiny_checkpoint):
    """What the API process builds (an image prompt's ids, token types, pixel values, grid) is what the engine gets."""
    builder = PromptBuilder.from_folder(str(tiny_checkpoint), 28 * 28 * 4, 28 * 28 * 16)
    prompt = builder.build([ChatTurn("user", (tongue_photo(), "舌象？"))])
    request = GenerationRequest("chatcmpl-1", prompt, SamplingParams(max_new_tokens=5, stop=("。",), seed=3))
    payload, frames = wire.encode_request(request)
    incarnation, kind, received = wire.unpack(wire.pack(7, wire.ADD, payload))
    assert (incarnation, kind) == (7, wire.ADD)
    decoded = wire.decode_request(received, [b"", *(bytes(frame) for frame in frames)])
    assert decoded.sampling == request.sampling and decoded.request_id == request.request_id
    for name in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        sent, got = getattr(prompt, name), getattr(decoded.prompt, name)
        assert got.dtype == sent.dtype and torch.equal(got, sent), name
    assert decoded.prompt.image_token_id == prompt.image_token_id and decoded.prompt.num_image_tokens > 0


def test_memory_planning_prefills_the_heaviest_prompt_images_included(tiny_checkpoint):
    """The prefill that measures the activation peak fills the whole token budget with as many largest-size images
    as fit, so the vision tower is part of what the KV cache is sized around; it runs through the engine's own
    prefill into a throwaway cache."""
    loaded = load_model(str(tiny_checkpoint))
    builder = PromptBuilder(loaded.processor, image_min_pixels=64 * 28 * 28, image_max_pixels=256 * 28 * 28)
    images_seen = []
    loaded.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, output: images_seen.append(len(kwargs["grid_thw"])), with_kwargs=True)

    prompt = builder.planning_prompt(1100)
    assert prompt.num_tokens == 1100 and prompt.num_image_tokens == 4 * 256  # a fifth image would not fit
    runner = ModelRunner(loaded, slots=2, max_len=1100)
    cache_bytes = runner.probe_prefill(prompt)
    assert images_seen == [4]
    assert cache_bytes >= 1100 * runner.kv_bytes_per_token

    text_only = builder.planning_prompt(200)
    assert text_only.num_tokens == 200 and text_only.pixel_values is None
    runner.probe_prefill(text_only)
    assert images_seen == [4]


def test_packed_vision_attention_sees_what_per_window_attention_sees(tiny_checkpoint):
    """The engine's one-call vision attention (windows and images as rows of a masked batch) gives the image
    features transformers' window-by-window attention gives, for images of different sizes in one call."""
    loaded = load_model(str(tiny_checkpoint))
    builder = PromptBuilder(loaded.processor, image_min_pixels=64 * 28 * 28, image_max_pixels=768 * 28 * 28)
    photos = [tongue_photo(width, height) for width, height in ((1536, 1152), (300, 500), (448, 448))]
    prompt = builder.build([ChatTurn("user", tuple(photos))])
    visual = loaded.model.model.visual
    with torch.inference_mode():
        expected = visual(prompt.pixel_values, grid_thw=prompt.image_grid_thw).pooler_output
        use_packed_vision_attention(loaded.model)
        packed = visual(prompt.pixel_values, grid_thw=prompt.image_grid_thw).pooler_output
    assert packed.shape == expected.shape == (prompt.num_image_tokens, loaded.model.config.text_config.hidden_size)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)
