"""Forward-only access to a language model: scores of continuous prompts, nothing else.

In the black-box setting (Black-Box Tuning, Sun et al. 2022) the model sits behind an API. A client
sends continuous prompts (``P`` prompts of ``T`` vectors of the model's embedding width ``H``) and a
batch of ``B`` texts; for every (prompt, text) pair the API prepends the prompt to the embedded text
(filled into the scorer's ``template``) and returns the logits that the language-model head gives the
label words at the next token. No gradients, no weights: only :class:`ScorerInfo`, what a service
would publish (embedding width, the standard deviation of its word embeddings, label words, template).

Two adapters implement :class:`PromptScorer`: :class:`HuggingFaceScorer` runs any Hugging Face causal
LM in process; :class:`HTTPScorer` talks to ``pflat serve-scorer`` (the JSON API documented in
:mod:`pflat_lightning.black_box.server`). Both return the same numbers for the same model.
"""
from __future__ import annotations

import json
import string
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from pflat_lightning.bundled import resolve_model
from pflat_lightning.datamodules.private_splits import special_tokens
from pflat_lightning.families import SoftCappedHead, family_for, lm_head
from pflat_lightning.prefix_model import label_word_ids, load_backbone

#: Template of the sentiment tasks: the label word is read as the token after "It was".
DEFAULT_TEMPLATE = "{text} It was"


@dataclass(frozen=True)
class ScorerInfo:
    """What a scoring service tells its clients about the model behind it.

    Args:
        model: the model's name.
        hidden_size: width ``H`` of each prompt vector (the model's embedding width).
        embedding_std: standard deviation of the model's word-embedding entries (BBT scales its random
            projection by it so that prompts live on the embeddings' scale).
        label_words: one word per class, each a single token.
        template: where the text goes, e.g. ``"{text} It was"``; label words are read at the next token.
        max_length: most tokens of a filled template (the text is truncated, never the template).
    """

    model: str
    hidden_size: int
    embedding_std: float
    label_words: Tuple[str, ...]
    template: str
    max_length: int

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    def to_json(self) -> Dict[str, Any]:
        return {**asdict(self), "label_words": list(self.label_words), "num_labels": self.num_labels}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ScorerInfo":
        fields = {k: data[k] for k in ("model", "hidden_size", "embedding_std", "template", "max_length")}
        return cls(**fields, label_words=tuple(data["label_words"]))


@runtime_checkable
class PromptScorer(Protocol):
    """Anything that scores continuous prompts on texts (see the module docstring)."""

    info: ScorerInfo

    def label_logits(self, prompts: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Label-word logits ``(P, B, num_labels)`` of ``prompts`` ``(P, T, hidden_size)`` on ``B`` texts."""
        ...


def check_request(prompts: Any, texts: Any, info: ScorerInfo) -> torch.Tensor:
    """Validate a scoring request; return the prompts as a contiguous float32 tensor.

    Raises:
        ValueError: naming the argument, the value and what is allowed.
    """
    if not isinstance(prompts, torch.Tensor):
        raise ValueError(f"prompts must be a tensor (or nested list) of numbers, got {type(prompts).__name__}.")
    if prompts.dim() != 3 or prompts.shape[0] < 1 or prompts.shape[1] < 1 or prompts.shape[2] != info.hidden_size:
        raise ValueError(
            f"prompts must have shape (num_prompts >= 1, num_tokens >= 1, hidden_size={info.hidden_size}), got "
            f"{tuple(prompts.shape)}."
        )
    if not prompts.is_floating_point():
        raise ValueError(f"prompts must hold floating-point numbers, got dtype {prompts.dtype}.")
    prompts = prompts.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(prompts).all()):
        raise ValueError("prompts must be finite; they hold NaN or infinite values.")
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts must be a list of strings, but texts[{i}] is {text!r} ({type(text).__name__}).")
    return prompts


def parse_template(template: str) -> Tuple[str, str]:
    """The text before and after ``{text}``; refuses anything but exactly one plain ``{text}`` field."""
    if not isinstance(template, str):
        raise ValueError(f"template must be a string containing '{{text}}' once, got {template!r}.")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"template={template!r} is not a valid format string: {error}.") from error
    fields = [field for _, field, _, _ in parsed if field is not None]
    if fields != ["text"] or any(spec or conversion for _, _, spec, conversion in parsed):
        raise ValueError(
            f"template must contain the plain field '{{text}}' exactly once and no other field, got {template!r} "
            "(the label word is read at the token after the template, e.g. '{text} It was')."
        )
    head, _, tail = template.partition("{text}")
    return head.replace("{{", "{").replace("}}", "}"), tail.replace("{{", "{").replace("}}", "}")


class HuggingFaceScorer:
    """Scores continuous prompts with a Hugging Face causal LM in this process, forward only.

    Each prompt is prepended (after the tokenizer's leading special tokens, e.g. a BOS) to the embedded
    text filled into ``template``, fed through ``inputs_embeds``; the label-word logits are those of
    the language-model head at the last token, as Black-Box Tuning reads label words. Rows are
    right-padded and scored ``batch_size`` (prompt, text) pairs at a time, without gradients.

    Args:
        model: a bundled name (``"bundled-smollm2"``), a local folder or a hub id of a causal LM.
        label_words: one word per class; each must be a single token (with the family's leading space).
        template: the text's place, ``{text}`` once; the label word follows the template.
        max_length: most tokens of a filled template; longer texts are truncated (the template is kept).
        batch_size: (prompt, text) pairs per forward pass.

    Raises:
        ValueError: for a masked (not causal) LM, a label word that is not one token, a bad template,
            or a ``max_length`` that leaves no room for text.

    Example::

        scorer = HuggingFaceScorer("bundled-smollm2", ["terrible", "great"], template="{text} It was")
        logits = scorer.label_logits(torch.zeros(1, 5, scorer.info.hidden_size), ["A gem of a film."])
    """

    def __init__(
        self,
        model: str,
        label_words: Sequence[str],
        *,
        template: str = DEFAULT_TEMPLATE,
        max_length: int = 128,
        batch_size: int = 32,
    ) -> None:
        if isinstance(label_words, str) or len(label_words) < 2:
            raise ValueError(f"label_words must list one word per class (at least 2), got {label_words!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}.")
        head, tail = parse_template(template)
        path = resolve_model(model)
        try:
            backbone = load_backbone(path, "label_words")
        except OSError as error:
            raise ValueError(f"model={model!r} is neither a bundled model, a local folder nor a reachable hub id: {error}") from error
        family = family_for(backbone.config)
        if family.bidirectional:
            raise ValueError(
                f"model={model!r} is a masked LM ({family.name}); the black-box scorer reads the next token of a causal "
                "LM (a decoder family: gpt2, llama, gemma, ...)."
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = backbone.eval().requires_grad_(False)
        self.label_ids = torch.as_tensor(label_word_ids(self.tokenizer, label_words, family.label_word_prefix))
        head_layer = lm_head(self.model, family)
        #: Gemma 2's final logit soft-capping (elementwise, so it applies to the label words' logits alone).
        self._cap = head_layer.cap if isinstance(head_layer, SoftCappedHead) else None
        head_layer = head_layer.head if self._cap is not None else head_layer
        self._head_weight = head_layer.weight[self.label_ids].detach()
        bias = getattr(head_layer, "bias", None)
        self._head_bias = None if bias is None else bias[self.label_ids].detach()
        self._lead, _ = special_tokens(self.tokenizer, model)
        stripped = head.rstrip()
        self._head_ids = self.tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped else []
        self._text_space = head[len(stripped):]  # BPE vocabularies fold the space into the text's first token
        tail = tail.rstrip()  # label words carry their own leading space
        self._tail_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        fixed = len(self._lead) + len(self._head_ids) + len(self._tail_ids)
        if max_length - fixed < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for text in template={template!r}: the template and special "
                f"tokens take {fixed} tokens; use max_length > {fixed}."
            )
        self._budget = max_length - fixed
        self.batch_size = batch_size
        embeddings = self.model.get_input_embeddings().weight
        self.info = ScorerInfo(
            model=model,
            hidden_size=embeddings.shape[1],
            embedding_std=float(embeddings.float().std()),
            label_words=tuple(label_words),
            template=template,
            max_length=max_length,
        )

    def token_ids(self, texts: Sequence[str]) -> List[List[int]]:
        """Each text filled into the template, as token ids (leading special tokens included)."""
        if not texts:
            return []
        encoded = self.tokenizer([self._text_space + t for t in texts], add_special_tokens=False)["input_ids"]
        return [self._lead + self._head_ids + ids[: self._budget] + self._tail_ids for ids in encoded]

    @torch.no_grad()
    def label_logits(self, prompts: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        prompts = check_request(prompts, texts, self.info)
        num_prompts, num_tokens, _ = prompts.shape
        if not texts:
            return prompts.new_zeros(num_prompts, 0, self.info.num_labels)
        ids = self.token_ids(texts)
        lengths = torch.tensor([len(row) for row in ids])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), int(lengths.max())), pad, dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
        mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        device = self._head_weight.device
        embedded = self.model.get_input_embeddings()(input_ids.to(device))
        lead = len(self._lead)
        pairs = torch.arange(num_prompts * len(ids))
        logits = []
        for chunk in pairs.split(self.batch_size):
            p, b = chunk // len(ids), chunk % len(ids)
            rows = embedded[b]
            inputs = torch.cat([rows[:, :lead], prompts[p].to(device, embedded.dtype), rows[:, lead:]], dim=1)
            attention = torch.cat([mask[b, :lead], mask.new_ones(len(chunk), num_tokens), mask[b, lead:]], dim=1)
            hidden = self.model.base_model(inputs_embeds=inputs, attention_mask=attention.to(device), use_cache=False)
            last = hidden.last_hidden_state[torch.arange(len(chunk)), num_tokens + lengths[b] - 1]
            scores = F.linear(last.float(), self._head_weight.float(),
                              None if self._head_bias is None else self._head_bias.float())
            logits.append(scores if self._cap is None else self._cap * torch.tanh(scores / self._cap))
        return torch.cat(logits).cpu().view(num_prompts, len(ids), self.info.num_labels)


class HTTPScorer:
    """Scores continuous prompts through the JSON API of ``pflat serve-scorer``.

    Reads the service's :class:`ScorerInfo` from ``GET /info`` at construction; each
    :meth:`label_logits` is one ``POST /score``. Prompts and logits travel as JSON numbers, which carry
    float32 values exactly, so the scores equal those of the same model in process.

    Args:
        url: the service's address, e.g. ``"http://127.0.0.1:8765"``.
        timeout: seconds to wait for one reply.

    Raises:
        ValueError: for a bad ``url`` or ``timeout``, and when the service refuses a request (its 400
            message is passed on).
        ConnectionError: when the service cannot be reached or fails.

    Example::

        scorer = HTTPScorer("http://127.0.0.1:8765")
        logits = scorer.label_logits(torch.zeros(1, 5, scorer.info.hidden_size), ["A gem of a film."])
    """

    def __init__(self, url: str, *, timeout: float = 600.0) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}.")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.info = ScorerInfo.from_json(self._request("/info"))

    def label_logits(self, prompts: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        prompts = check_request(prompts, texts, self.info)
        reply = self._request("/score", {"prompts": prompts.tolist(), "texts": list(texts)})
        logits = torch.tensor(reply["logits"], dtype=torch.float32)
        return logits.view(prompts.shape[0], len(texts), self.info.num_labels)

    def _request(self, path: str, payload: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error", "")
            except ValueError:
                message = ""
            if error.code == 400:
                raise ValueError(f"The scorer at {self.url} refused the request: {message}") from None
            raise ConnectionError(f"The scorer at {self.url}{path} answered {error.code} {error.reason}: {message}") from None
        except (urllib.error.URLError, OSError) as error:
            raise ConnectionError(f"Cannot reach the scorer at {self.url}: {error}") from None
