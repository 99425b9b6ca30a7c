"""SafeTensors embedding and rerank models, through transformers and torch.

An embedding model is an encoder (``AutoModel``) whose token states are pooled and normalized as
the folder's sentence-transformers files declare (``modules.json``, ``1_Pooling/config.json``,
a ``Normalize`` module; read by
:func:`~shimmy_plugins.backends.safetensors.safetensors_format.read_sentence_transformers`); a
plain encoder folder gets mean pooling, unnormalized.  A rerank model is a cross-encoder
(``AutoModelForSequenceClassification``, one label) that reads each query and document as a
pair; its score is the raw logit.  Inputs are sorted by length and run in padded batches.

Imported only when such a model loads (it imports torch).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from shimmy_core.plugin_api import EmbeddingInput, Embeddings, InputTokens, ModelLoadError, RERANK
from shimmy_core.plugin_api import RerankScores, Skip
from shimmy_plugins.backends.safetensors.safetensors_format import config_context_length, read_sentence_transformers
from shimmy_plugins.backends.safetensors.safetensors_model import load_pretrained

BATCH = 32   # inputs per forward pass


def load_embedding_model(info, settings, progress=None) -> "SafeTensorsEmbeddingModel":
    folder = Path(info.path)
    names = {p.name for p in folder.iterdir()}
    st = read_sentence_transformers(folder, names)
    if isinstance(st, Skip):
        raise ModelLoadError(f"refusing to load {folder}: {st.reason}")
    auto = "AutoModelForSequenceClassification" if info.kind == RERANK else "AutoModel"
    tokenizer, model, device, config = load_pretrained(info, settings, auto, progress=progress)
    limits = [n for n in (st.max_seq_length, config_context_length(config), settings.ctx_size or None,
                          _tokenizer_limit(tokenizer)) if n]
    return SafeTensorsEmbeddingModel(model, tokenizer, device, min(limits) if limits else 512, st.pooling,
                                     st.normalize, st.matryoshka_dimensions, int(config.get("hidden_size") or 0))


def _tokenizer_limit(tokenizer) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


class SafeTensorsEmbeddingModel:
    """A loaded encoder or cross-encoder; one request's batches at a time."""

    def __init__(self, model, tokenizer, device: torch.device, context_length: int, pooling: str, normalize: bool,
                 matryoshka: tuple[int, ...], hidden: int):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = context_length
        self.pooling = pooling
        self.normalized = normalize
        self.dimensions = hidden or int(model.config.hidden_size)
        self.matryoshka_dimensions = tuple(d for d in matryoshka if d < self.dimensions)
        self._lock = threading.Lock()
        closing = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self._inputs = InputTokens(lambda text: tokenizer(text, add_special_tokens=True)["input_ids"], len(tokenizer),
                                   context_length, closing)

    # ------------------------------------------------------------ running
    def _batches(self, rows: list[dict[str, list[int]]]):
        """``(indices, padded tensors)`` for batches of rows of similar length."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), BATCH):
            chunk = order[start:start + BATCH]
            width = max(len(rows[i]["input_ids"]) for i in chunk)
            tensors: dict[str, Any] = {}
            for key in rows[chunk[0]]:
                filler = pad if key == "input_ids" else 0
                tensors[key] = torch.tensor([rows[i][key] + [filler] * (width - len(rows[i][key])) for i in chunk],
                                            device=self.device)
            tensors["attention_mask"] = torch.tensor(
                [[1] * len(rows[i]["input_ids"]) + [0] * (width - len(rows[i]["input_ids"])) for i in chunk],
                device=self.device)
            yield chunk, tensors

    def embed(self, inputs: Sequence[EmbeddingInput], truncate: bool = False) -> Embeddings:
        rows = [{"input_ids": self._inputs.of(item, truncate, i)} for i, item in enumerate(inputs)]
        vectors: list[list[float]] = [[] for _ in rows]
        with self._lock, torch.inference_mode():
            for chunk, tensors in self._batches(rows):
                states = self.model(**tensors).last_hidden_state.float()
                pooled = pool(states, tensors["attention_mask"], self.pooling)
                if self.normalized:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                for i, row in zip(chunk, pooled.cpu().tolist()):
                    vectors[i] = row
        return Embeddings(vectors, sum(len(r["input_ids"]) for r in rows))

    def rerank(self, query: str, documents: Sequence[str], truncate: bool = False) -> RerankScores:
        rows = []
        for i, document in enumerate(documents):
            enc = self.tokenizer(query, document, truncation="only_second" if truncate else False,
                                 max_length=self.context_length if truncate else None)
            row = {k: list(enc[k]) for k in ("input_ids", "token_type_ids") if k in enc}
            self._inputs.fit(row["input_ids"], truncate, i, "documents")
            if len(row["input_ids"]) > self.context_length:  # the query alone is too long: cut the pair's end
                row = {k: self._inputs.fit(v, True, i, "documents") if k == "input_ids" else v[: self.context_length]
                       for k, v in row.items()}
            rows.append(row)
        scores = [0.0] * len(rows)
        with self._lock, torch.inference_mode():
            for chunk, tensors in self._batches(rows):
                logits = self.model(**tensors).logits.float()
                for i, value in zip(chunk, logits[:, 0].cpu().tolist()):
                    scores[i] = value
        return RerankScores(scores, sum(len(r["input_ids"]) for r in rows))

    def close(self) -> None:
        self.model = None


def pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per row of ``states`` (batch, tokens, hidden) over its unmasked tokens."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    if how == "cls":
        return states[:, 0]
    if how == "max":
        return states.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if how == "last":  # right padding: the last real token of each row
        last = mask.sum(dim=1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
