"""The SafeTensors backend in-process: the real SmolLM2 folder (converted from the
GGUF by the session fixture) loaded through the backend, plus small folders made
here for what the real one cannot show (refusals, a single-file checkpoint, a
missing generation_config.json)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from shimmy_core.contract.generation import (
    BackendUnavailable,
    ContextLengthExceeded,
    Finish,
    GenerationRequest,
    InvalidPrompt,
    ModelLoadError,
    Overloaded,
    OutputFormat,
    SamplingParams,
    TextDelta,
    Usage,
)
from shimmy_core.discovery import UNSUPPORTED, ModelFacts, Scanner, Skip
from shimmy_plugins.backends.safetensors.safetensors_format import CUSTOM_CODE, SafeTensorsFormat
from shimmy_core.contract.settings import Settings
from tests.conftest import assert_greedy_agrees, safetensors_missing, wait_for

pytestmark = pytest.mark.skipif(safetensors_missing() is not None, reason=str(safetensors_missing()))

PROMPTS = ["Name a color.", "Name a fruit.", "Name an animal.", "Name a country."]


def info_for(folder: Path, model_id: str = "smol"):
    [found] = [f for f in Scanner([SafeTensorsFormat()], max_depth=0).path(folder) if f.path == folder]
    assert isinstance(found.result, ModelFacts), found.result
    return found.result.info(model_id, "test")


def load(folder: Path, **settings):
    from shimmy_plugins.backends.safetensors.safetensors_backend import SafeTensorsBackend

    return SafeTensorsBackend().load(info_for(folder), Settings(**{"demo": False, **settings}))


@pytest.fixture(scope="module")
def model(safetensors_model_path):
    loaded = load(safetensors_model_path, parallel=4)
    yield loaded
    loaded.close()


def chat(content: str, **params) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": content},), params=SamplingParams(**params))


def run(model, request: GenerationRequest, cancelled=lambda: False):
    """(text, finish reason, usage, logprobs, chunks) of one choice."""
    prepared = model.prepare(request)
    chunks = list(model.generate(prepared, request.params, cancelled))
    text = "".join(c.text for c in chunks if isinstance(c, TextDelta))
    logprobs = [lp for c in chunks if isinstance(c, TextDelta) for lp in c.logprobs]
    [finish] = [c for c in chunks if isinstance(c, Finish)]
    [usage] = [c for c in chunks if isinstance(c, Usage)]
    assert isinstance(chunks[-1], Usage) and isinstance(chunks[-2], Finish)
    return text, finish.reason, usage, logprobs, chunks


# ------------------------------------------------------------------ the real model
def test_chat_template_stops_and_context(model):
    assert model.context_length == 8192
    assert model.eog >= {2}  # generation_config.json's eos_token_id (<|im_end|>)
    assert "<|im_end|>" in model.turn_stops
    prepared = model.prepare(chat("Say hello."))
    assert prepared.text.startswith("<|im_start|>system\n") and prepared.text.endswith("<|im_start|>assistant\n")
    assert prepared.tokens[0] == 1 and prepared.max_tokens == 4096  # the server-side ceiling
    text, reason, usage, _, _ = run(model, chat("Say hello.", temperature=0, max_tokens=64))
    assert reason == "stop" and text and "<|im_end|>" not in text
    assert usage.prompt_tokens == len(prepared.tokens) and 0 < usage.completion_tokens < 64


def test_raw_prompt_and_empty_prompt(model):
    text, reason, usage, _, _ = run(model, GenerationRequest(prompt="One, two, three,", params=SamplingParams(
        temperature=0, max_tokens=4)))
    assert reason == "length" and usage.completion_tokens == 4 and text
    prepared = model.prepare(GenerationRequest(prompt=""))
    assert prepared.tokens == (1,)  # nothing to decode from: start at BOS, as GGUF does


def test_context_checks_match_gguf(model):
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 8192") as info:
        model.prepare(chat("hello " * 9000))
    assert info.value.param == "messages"
    with pytest.raises(ContextLengthExceeded) as info:
        model.prepare(GenerationRequest(prompt="hi", params=SamplingParams(max_tokens=9000)))
    assert info.value.param == "max_tokens"
    near = model.prepare(GenerationRequest(prompt="hi " * 8180))
    assert near.max_tokens == 8192 - len(near.tokens)


def greedy_run(model, prompt: str) -> list[tuple[str, dict[str, float]]]:
    logprobs = run(model, chat(prompt, temperature=0, max_tokens=24, logprobs=True, top_logprobs=3))[3]
    return [(lp.token, {t.token: t.logprob for t in lp.top}) for lp in logprobs]


def test_greedy_agrees_alone_and_batched(model):
    """Rows batched together give the text each gives alone, up to, at most, a near tie:
    torch's CPU kernels do not promise bit-identical numbers across batch shapes."""
    alone = [greedy_run(model, p) for p in PROMPTS]
    results: dict[int, list] = {}
    steps = model.engine.steps
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, greedy_run(model, PROMPTS[i])))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert_greedy_agrees(alone[i], results[i], margin=0.05)
    assert model.engine.max_rows >= 2 and model.engine.steps - steps < 4 * 24  # rows really shared steps


def test_n_choices_run_as_rows_of_one_batch(model):
    prepared = model.prepare(chat(PROMPTS[0], temperature=0, max_tokens=12))
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    out: dict[int, list] = {}
    finishes: dict[int, str] = {}
    for index, chunk in model.generate_choices([(prepared, params)] * 3, lambda: False):
        if isinstance(chunk, TextDelta):
            out.setdefault(index, []).extend((lp.token, {t.token: t.logprob for t in lp.top}) for lp in chunk.logprobs)
        elif isinstance(chunk, Finish):
            finishes[index] = chunk.reason
    assert set(out) == {0, 1, 2} and len(finishes) == 3
    alone = greedy_run(model, PROMPTS[0])[:12]
    for index in out:  # rows of one batch: the same as alone, up to at most a near tie
        assert_greedy_agrees(alone, out[index], margin=0.05)


CAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 30},
                                        "color": {"enum": ["black", "white", "ginger", "grey"]}},
       "required": ["name", "age", "color"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"$ref": "#/$defs/unit"}},
           "required": ["city", "unit"], "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}}}


def test_an_output_format_is_enforced_greedy_and_sampled(model):
    import jsonschema

    for params in (dict(temperature=0), dict(temperature=1.0, seed=11)):
        text, reason, usage, _, _ = run(model, chat("Describe a cat.", max_tokens=60, output=OutputFormat(CAT),
                                                    **params))
        assert reason == "stop" and usage.completion_tokens < 60  # ended by the grammar, not the limit
        jsonschema.validate(json.loads(text), CAT)
    text, reason, _, _, _ = run(model, chat("Say hi.", temperature=0, max_tokens=40,
                                            output=OutputFormat({"type": "object"})))
    assert reason == "stop" and isinstance(json.loads(text), dict)


def test_forced_calls_name_a_tool_first_with_valid_arguments(model):
    import jsonschema

    calls = (("get_weather", WEATHER), ("get_time", None))
    text, reason, _, _, _ = run(model, chat("What is the weather in Paris?", temperature=0, max_tokens=40,
                                            output=OutputFormat(calls=calls[:1])))
    call = json.loads(text)
    assert reason == "stop" and list(call) == ["name", "arguments"] and call["name"] == "get_weather"
    jsonschema.validate(call["arguments"], WEATHER)
    # The end of turn banned: the grammar's up to 3 calls, one a line, then it stops.
    text, reason, _, _, _ = run(model, chat("What is the weather in Paris?", temperature=0, max_tokens=120,
                                            logit_bias=((2, -100.0),), output=OutputFormat(calls=calls, max_calls=3)))
    lines = [json.loads(line) for line in text.split("\n")]
    assert reason == "stop" and len(lines) == 3
    assert all(list(c) == ["name", "arguments"] and c["name"] in ("get_weather", "get_time") for c in lines)


def test_constrained_and_free_rows_share_a_batch(model):
    free = chat(PROMPTS[0], temperature=0, max_tokens=12)
    fixed = chat(PROMPTS[0], temperature=0, max_tokens=40, output=OutputFormat(CAT))
    alone = run(model, free)[0]
    chunks: dict[int, list] = {0: [], 1: []}
    for index, chunk in model.generate_choices([(model.prepare(free), free.params),
                                                (model.prepare(fixed), fixed.params)], lambda: False):
        chunks[index].append(chunk)
    texts = ["".join(c.text for c in chunks[i] if isinstance(c, TextDelta)) for i in (0, 1)]
    assert texts[0] == alone
    assert set(json.loads(texts[1])) == {"name", "age", "color"}


def test_logprobs_come_from_the_model_not_the_grammar(model):
    text, _, _, logprobs, _ = run(model, chat("Say hi.", temperature=0, max_tokens=3, logprobs=True, top_logprobs=2,
                                              output=OutputFormat(CAT)))
    first = logprobs[0]
    assert text.startswith('{"') and first.token == '{"'  # the only token the grammar allows first
    assert first.logprob < first.top[0].logprob <= 0  # its raw log-probability, not 0


def test_an_unenforceable_schema_is_refused_in_prepare_naming_the_tool(model):
    from shimmy_core.contract.generation import UnsupportedOutputSchema

    bad = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(UnsupportedOutputSchema) as info:
        model.prepare(chat("hi", output=OutputFormat(calls=(("get_weather", WEATHER), ("tag", bad)))))
    assert info.value.tool == "tag" and "uniqueItems" in info.value.detail
    with pytest.raises(UnsupportedOutputSchema) as info:
        model.prepare(chat("hi", output=OutputFormat({"not": {"type": "null"}}, calls=(("get_weather", WEATHER),))))
    assert info.value.tool is None and "not" in info.value.detail
    assert model.stats() == {"busy_slots": 0, "queued": 0}


def test_a_failing_matcher_ends_its_request_and_the_engine_goes_on(model, monkeypatch):
    from shimmy_plugins.backends.safetensors.safetensors_constraints import ConstraintError, TokenConstraint

    class Broken:
        def compute_bitmask(self):
            raise RuntimeError("boom")

    monkeypatch.setattr(model.constraints, "constraint", lambda output, after=None: TokenConstraint(Broken()))
    with pytest.raises(ConstraintError, match="output grammar failed: RuntimeError: boom"):
        run(model, chat("Say hi.", temperature=0, max_tokens=8, output=OutputFormat({"type": "object"})))
    monkeypatch.undo()
    assert wait_for(lambda: model.stats() == {"busy_slots": 0, "queued": 0})
    assert run(model, chat("Say hi.", temperature=0, max_tokens=4))[2].completion_tokens > 0


def test_seed_reproduces_and_differs(model):
    a = run(model, chat("Tell me a fun fact.", temperature=1.0, seed=1234, max_tokens=16))[0]
    b = run(model, chat("Tell me a fun fact.", temperature=1.0, seed=1234, max_tokens=16))[0]
    c = run(model, chat("Tell me a fun fact.", temperature=1.0, seed=99, max_tokens=16))[0]
    assert a == b and a != c
    nucleus = run(model, chat("Tell me a fun fact.", temperature=0.7, top_p=0.1, seed=5, max_tokens=8))[0]
    greedy = run(model, chat("Tell me a fun fact.", temperature=0, max_tokens=8))[0]
    assert nucleus == greedy  # top_p 0.1 keeps only the most likely token here


def test_logit_bias_bans_end_of_turn_and_fixes_the_length(model):
    text, reason, usage, _, _ = run(model, chat("Say hi.", temperature=0, max_tokens=40, logit_bias=((2, -100.0),)))
    assert reason == "length" and usage.completion_tokens == 40
    forced = run(model, chat("Say hi.", temperature=0, max_tokens=3, logit_bias=((28, 100.0),)))[0]
    assert forced == ",,,"  # token 28 is ","


def test_penalties_change_repetition(model):
    base = dict(temperature=0, max_tokens=48, logit_bias=((2, -100.0),))
    plain = run(model, chat("Repeat the word cat many times.", **base))[0]
    penalized = run(model, chat("Repeat the word cat many times.", frequency_penalty=2.0, presence_penalty=1.0,
                                **base))[0]
    assert plain != penalized
    assert penalized.lower().count("cat") < plain.lower().count("cat")


def test_logprobs_are_raw_log_softmax_and_sorted(model):
    text, _, usage, logprobs, _ = run(model, chat("Say hello.", temperature=0, max_tokens=6, logprobs=True,
                                                  top_logprobs=3))
    assert len(logprobs) == usage.completion_tokens == 6
    for item in logprobs:
        assert item.logprob <= 0 and len(item.top) == 3
        assert [t.logprob for t in item.top] == sorted((t.logprob for t in item.top), reverse=True)
        assert item.logprob == pytest.approx(item.top[0].logprob, abs=1e-6)
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token
    assert b"".join(bytes(i.bytes) for i in logprobs).decode() == text
    # logit_bias changes the choice, not the reported numbers (llama.cpp reports raw logits too)
    biased = run(model, chat("Say hello.", temperature=0, max_tokens=1, logprobs=True, top_logprobs=1,
                             logit_bias=((28, 100.0),)))[3][0]
    assert biased.token == "," and biased.logprob < biased.top[0].logprob


def test_stop_strings_and_streaming_are_consistent(model):
    base = dict(temperature=0, max_tokens=40)
    full = run(model, chat("Count from 1 to 10, separated by commas.", **base))[0]
    assert "3" in full
    text, reason, usage, _, chunks = run(model, chat("Count from 1 to 10, separated by commas.", stop=("3",), **base))
    assert reason == "stop" and "3" not in text and full.startswith(text)
    assert usage.completion_tokens < 20


def test_multibyte_text_is_never_split(model):
    from shimmy_plugins.backends.safetensors.safetensors_text import IncrementalDecoder

    tok = model.tokenizer
    sample = "Emoji 🐉🔥, accents é à ü, CJK 漢字 and 한국어."
    ids = tok.encode(sample, add_special_tokens=False)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == sample
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids)  # some characters span several tokens
    assert b"".join(model.pieces.bytes(i) for i in ids) == sample.encode()
    assert model.pieces.bytes(2) == b""  # control tokens print as nothing, as in llama.cpp


def test_cancel_ends_with_length_and_frees_the_row(model):
    seen = []

    def cancelled():
        return len(seen) >= 3

    prepared = model.prepare(chat("Write a long story.", temperature=0))
    chunks = []
    for chunk in model.generate(prepared, SamplingParams(temperature=0, logit_bias=((2, -100.0),)), cancelled):
        chunks.append(chunk)
        if isinstance(chunk, TextDelta):
            seen.append(chunk)
    assert isinstance(chunks[-2], Finish) and chunks[-2].reason == "length"
    assert chunks[-1].completion_tokens < 20
    deadline = time.monotonic() + 10
    while model.stats()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert model.stats() == {"busy_slots": 0, "queued": 0}


def test_full_queue_and_queue_timeout_are_overloaded(model, safetensors_model_path):
    from shimmy_plugins.backends.safetensors.safetensors_model import SafeTensorsModel

    # the waiter must still be queued when the second request comes, even on a loaded machine
    # (20 s: a CI run once saw the second request come after the waiter's 8 s had run out)
    settings = Settings(parallel=1, queue_size=1, queue_timeout=20.0)
    one_slot = SafeTensorsModel(model.info, model.model, model.tokenizer, model.device, settings,
                                config=json.loads((safetensors_model_path / "config.json").read_text()),
                                generation={"eos_token_id": 2})
    try:
        long = (one_slot.prepare(chat("Write a long story.")), SamplingParams(temperature=0, logit_bias=((2, -100.0),)))
        running = one_slot.generate_choices([long], lambda: False)
        next(running)  # generating: the only slot is taken
        waiting: dict = {}
        waiter = threading.Thread(target=lambda: waiting.setdefault("error", _overloaded(one_slot, long)))
        waiter.start()
        deadline = time.monotonic() + 60  # a loaded machine may take a while to queue it
        while one_slot.stats()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(Overloaded) as full:
            one_slot.generate_choices([long], lambda: False)
        assert not full.value.timed_out and full.value.retry_after >= 1
        waiter.join(timeout=60)
        assert waiting["error"] is not None and waiting["error"].timed_out  # waited 20 s, then 503
        running.close()
    finally:
        one_slot.engine.close()


def _overloaded(model, choice):
    try:
        model.generate_choices([choice], lambda: False)
    except Overloaded as exc:
        return exc
    return None


# ------------------------------------------------------------------ device and dtype
def test_device_and_dtype_choice():
    import torch

    from shimmy_plugins.backends.safetensors.safetensors_model import pick_device, pick_dtype

    cpu = torch.device("cpu")
    assert pick_device("cpu") == cpu
    assert pick_dtype("auto", cpu, {"dtype": "bfloat16"}) == torch.float32  # fp32 on the CPU
    assert pick_dtype("bf16", cpu, {}) == torch.bfloat16 and pick_dtype("float16", cpu, {}) == torch.float16
    with pytest.raises(BackendUnavailable, match="unknown dtype"):
        pick_dtype("int3", cpu, {})
    with pytest.raises(BackendUnavailable, match="unknown device"):
        pick_device("tpu-please")
    if torch.cuda.is_available():
        assert pick_device("auto").type == "cuda"
        assert pick_dtype("auto", torch.device("cuda"), {"dtype": "float16"}) == torch.float16
    else:
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
            pick_device("cuda")


@pytest.mark.skipif(not os.environ.get("SHIMMY_TEST_CUDA"), reason="GPU path: set SHIMMY_TEST_CUDA=1 on a CUDA machine")
def test_cuda_load_and_generate(safetensors_model_path):
    loaded = load(safetensors_model_path, device="cuda", parallel=4)
    try:
        assert loaded.device.type == "cuda"
        assert next(loaded.model.parameters()).dtype.is_floating_point
        text, reason, usage, _, _ = run(loaded, chat("Say hello.", temperature=0, max_tokens=16))
        assert text and usage.completion_tokens > 0
    finally:
        loaded.close()


# ------------------------------------------------------------------ small folders made here
def _tiny_folder(folder: Path, tokenizer_from: Path, *, generation: bool = True) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer, in a single model.safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    doc = config.to_dict()
    doc["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(doc))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    if generation:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


def test_single_file_checkpoint_without_generation_config(tmp_path, safetensors_model_path):
    folder = _tiny_folder(tmp_path / "tiny", safetensors_model_path, generation=False)
    loaded = load(folder, dtype="bfloat16", max_tokens_ceiling=10)
    try:
        assert next(loaded.model.parameters()).dtype.is_floating_point
        assert str(next(loaded.model.parameters()).dtype) == "torch.bfloat16"
        assert 2 in loaded.eog and loaded.context_length == 512  # eos from config.json; its context
        text, reason, usage, _, _ = run(loaded, chat("hi", temperature=0, logit_bias=((2, -100.0), (0, -100.0))))
        assert reason == "length" and usage.completion_tokens == 10  # the ceiling
    finally:
        loaded.close()


def test_generation_config_lists_every_end_id(tmp_path, safetensors_model_path):
    loaded = load(_tiny_folder(tmp_path / "tiny", safetensors_model_path))
    try:
        assert loaded.eog >= {0, 2}
    finally:
        loaded.close()


@pytest.mark.parametrize("case", ["auto_map", "pickle_only", "tokenizer_auto_map"])
def test_unsafe_folders_are_refused_in_discovery_and_at_load(tmp_path, safetensors_model_path, case):
    from shimmy_plugins.backends.safetensors.safetensors_backend import SafeTensorsBackend, check_folder

    folder = _tiny_folder(tmp_path / case, safetensors_model_path)
    config = json.loads((folder / "config.json").read_text())
    if case == "auto_map":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
        expect = "auto_map"
    elif case == "pickle_only":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        expect = "pickle"
    else:
        doc = json.loads((folder / "tokenizer_config.json").read_text())
        doc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(doc))
        expect = "tokenizer_config.json"
    found = Scanner([SafeTensorsFormat()], max_depth=0).path(folder)
    if case != "tokenizer_auto_map":  # discovery reads config.json and the weights, not the tokenizer
        [skip] = [f.result for f in found if f.path == folder]
        assert isinstance(skip, Skip) and skip.category in (CUSTOM_CODE, UNSUPPORTED)
    with pytest.raises(ModelLoadError, match=expect):
        check_folder(folder)
    fake = dataclasses.replace(info_for(safetensors_model_path), path=str(folder))
    with pytest.raises(ModelLoadError, match=expect):
        SafeTensorsBackend().load(fake, Settings(demo=False))


def test_load_progress_comes_from_transformers_bars():
    """While a model loads, transformers' bars (one step per tensor) report to the core's progress
    instead of drawing their own; afterwards they are transformers' again."""
    from transformers.utils import logging as hf_logging

    from shimmy_plugins.backends.safetensors.safetensors_model import _reported_bars

    if not hasattr(hf_logging, "set_tqdm_hook"):
        pytest.skip("transformers before 5.0 has no set_tqdm_hook: the load reports its steps only")
    seen: list[float] = []
    before = hf_logging.set_tqdm_hook(None)
    hf_logging.set_tqdm_hook(before)
    with _reported_bars(seen.append, 0.1, 0.9):
        bar = hf_logging.tqdm(range(4), desc="Loading weights")
        assert list(bar) == [0, 1, 2, 3]
        bar.set_postfix(x=1)  # whatever else a bar is asked, it draws nothing
        bar.close()
    assert seen == pytest.approx([0.3, 0.5, 0.7, 0.9])
    assert hf_logging.set_tqdm_hook(before) is before  # the previous hook is back


# ------------------------------------------------------------------ the sampling chain on made-up logits
def test_sampler_chain_matches_llama_cpp_semantics():
    import torch

    from shimmy_plugins.backends.safetensors.safetensors_engine import _Sampler

    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert _Sampler(SamplingParams(temperature=0), 4).sample(logits) == 1
    assert _Sampler(SamplingParams(temperature=0, logit_bias=((3, 5.0), (99, 1.0))), 4).sample(logits) == 3
    penal = _Sampler(SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.5), 4)
    penal.accept(1)
    assert penal.sample(logits) == 2  # 3 - 1*0.6 - 0.5 = 1.9 < 2
    window = _Sampler(SamplingParams(frequency_penalty=0.1), 1000)
    for token in range(300):
        window.accept(token)
    assert sorted(window.counts) == list(range(44, 300))  # the last 256 generated tokens only

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = probs.log()

    def drawn(**params) -> set[int]:
        return {_Sampler(SamplingParams(seed=seed, **params), 4).sample(x) for seed in range(200)}

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_p=0.5) == {0}             # 0.5 already reaches top_p: keep one
    assert drawn(top_p=0.6) == {0, 1}          # the token that crosses top_p is kept
    assert drawn(top_k=3) == {0, 1, 2}
    assert drawn(min_p=0.35) == {0, 1}         # p >= 0.35 * 0.5
    assert drawn(top_k=3, top_p=0.95, min_p=0.01) == {0, 1, 2}
    assert drawn(temperature=0.02) == {0}            # p(1) = 1e-11
    seeded = [_Sampler(SamplingParams(seed=7), 4).sample(x) for _ in range(5)]
    assert len(set(seeded)) == 1
    assert math.isclose(float(torch.softmax(x, -1)[0]), 0.5, rel_tol=1e-6)
