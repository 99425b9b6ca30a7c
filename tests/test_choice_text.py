"""shimmy_core.choice_text: the per-choice steps both backends share (their real-model tests
cover them end to end: stop strings, logprobs, UTF-8 across tokens)."""

from __future__ import annotations

import codecs

from shimmy_core.choice_text import ChoiceText
from shimmy_core.contract.generation import Finish, TextDelta, TokenLogprob, Usage


def byte_text(stop=()) -> ChoiceText:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return ChoiceText(stop, n_prompt=7, decode=decoder.decode, flush=lambda: decoder.decode(b"", final=True))


def lp(token: str) -> TokenLogprob:
    return TokenLogprob(token, -0.5, tuple(token.encode()))


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks if isinstance(c, TextDelta))


def test_a_character_split_across_tokens_comes_out_whole_and_each_token_keeps_its_logprob():
    out = byte_text()
    first = out.add("é".encode()[:1], lp("\ufffd"))
    assert first == [TextDelta("", (lp("\ufffd"),))]  # no text yet; the token's logprob goes on
    second = out.add("é".encode()[1:], lp("\ufffd"))
    assert second == [TextDelta("é", (lp("\ufffd"),))]
    end = out.finish("length")
    assert end == [Finish("length"), Usage(7, 2, 0)] and out.done


def test_a_stop_string_across_tokens_ends_the_choice_and_is_not_shown():
    out = byte_text(stop=("END",))
    chunks = out.add(b"Hello E") + out.add(b"N") + out.add(b"D and more")
    assert text_of(chunks) == "Hello " and chunks[-2:] == [Finish("stop", "END"), Usage(7, 3, 0)] and out.done


def test_held_back_text_is_released_at_the_end_and_cached_tokens_are_reported():
    out = byte_text(stop=("END",))
    out.cached = 5
    chunks = out.add(b"almost E")
    assert text_of(chunks) == "almost "
    assert out.finish("length") == [TextDelta("E"), Finish("length"), Usage(7, 1, 5)]
