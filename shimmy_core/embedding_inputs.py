"""The inputs of an embedding or rerank model as token ids, the same in every backend: a text
tokenized by the model, token ids checked against its vocabulary, and an input over the model's
context refused (``ContextLengthExceeded``) or, when the request allows it, cut to fit with its
closing special token kept."""

from __future__ import annotations

from typing import Callable

from shimmy_core.contract.embedding import EmbeddingInput
from shimmy_core.contract.generation import ContextLengthExceeded, InvalidRequest


class InputTokens:
    """``tokenize(text)`` gives a text's ids with the model's special tokens; ``closing`` is the
    token that ends an input (``[SEP]``, ``</s>``; ``None``: none)."""

    def __init__(self, tokenize: Callable[[str], list[int]], vocab_size: int, context_length: int,
                 closing: int | None):
        self.tokenize = tokenize
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.closing = closing

    def of(self, item: EmbeddingInput, truncate: bool, index: int) -> list[int]:
        """The ids of one ``input`` (a text, or the model's own token ids, used as given)."""
        if isinstance(item, str):
            tokens = list(self.tokenize(item))
        else:
            tokens = list(item)
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"Input {index} has the token id {bad[0]}, outside this model's vocabulary "
                                     f"(0 to {self.vocab_size - 1}).", param="input", code="invalid_token")
        if not tokens:
            raise InvalidRequest(f"Input {index} is empty.", param="input", code="empty_input")
        return self.fit(tokens, truncate, index)

    def fit(self, tokens: list[int], truncate: bool, index: int, param: str = "input") -> list[int]:
        """``tokens`` if they fit the context; else cut (``truncate``) or refused."""
        if len(tokens) <= self.context_length:
            return tokens
        if not truncate:
            what = "Input" if param == "input" else "Document"
            raise ContextLengthExceeded(
                f"{what} {index} is {len(tokens)} tokens long; this model reads at most {self.context_length} "
                "tokens. Shorten it, or send truncate: true to cut it.", param=param)
        if self.closing is not None and tokens[-1] == self.closing:
            return tokens[: self.context_length - 1] + [tokens[-1]]
        return tokens[: self.context_length]
