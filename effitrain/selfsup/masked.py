"""Masked-language-model pre-training (Devlin et al. 2019; ULMFiT's point that a language model
tuned on the task's own texts transfers better) of a transformers classifier's encoder.

transformers' `DataCollatorForLanguageModeling` masks 15% of the tokens of each text (80% [MASK],
10% random, 10% kept; special and padding tokens never); the encoder of the classifier is shared
with a masked-LM head of its family (`AutoModelForMaskedLM` built from its config, output
embeddings tied to the encoder's word embeddings), which predicts the masked tokens. Labels are
never read. Only masked positions go through the head (its vocabulary-wide matmul is most of
the cost); models whose head is not one module fall back to the head's own forward.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.errors import ConfigError
from effitrain.tasks.base import Task


class Masking:
    """Collate for pre-training: tokenised texts, masked; labels are the masked tokens (-100 elsewhere).

    Args:
        tokenizer: the data's tokenizer (mask token, vocabulary, special tokens).
        probability: the share of tokens masked.
    """

    def __init__(self, tokenizer: Any, probability: float) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=probability, return_tensors="pt")

    def __call__(self, samples: list) -> tuple[dict[str, Tensor], Tensor]:
        batch = self.collator([{"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]} for inputs, _ in samples])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["labels"]


class MaskedLM(nn.Module):
    """The training loss `loss(classifier, masked inputs, token labels)`: cross-entropy of the
    masked tokens, through the classifier's own encoder and a masked-LM head.

    Args:
        classifier: a transformers model (its `base_model` is the encoder; its config builds the head).
        where: names the stage in errors.
    """

    def __init__(self, classifier: nn.Module, where: str) -> None:
        super().__init__()
        from transformers import AutoModelForMaskedLM

        try:
            language_model = AutoModelForMaskedLM.from_config(classifier.config)
        except ValueError as error:  # a model family without a masked-LM head
            raise ConfigError(f"{where}.method = 'mlm': {type(classifier).__name__} has no masked-language-model head in transformers "
                              f"({str(error).splitlines()[0][:160]}) (allowed: simclr on images)") from None
        embeddings = classifier.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise ConfigError(f"{where}.method = 'mlm': the word embeddings are a {type(embeddings).__name__} (trimmed or factorised); "
                              "a masked-LM head predicts over the whole vocabulary (allowed: pre-train before vocab trimming)")
        prefix = language_model.base_model_prefix
        setattr(language_model, prefix, classifier.base_model)  # the classifier's encoder, shared
        language_model.tie_weights()  # the head's output embeddings are the encoder's word embeddings
        heads = [child for name, child in language_model.named_children() if name != prefix]
        self.head = heads[0] if len(heads) == 1 else None
        self._language_model = [language_model]  # its encoder is the classifier's: not a second copy in this module's state
        if self.head is None:
            self.rest = nn.ModuleList(heads)

    def forward(self, classifier: nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> Tensor:  # type: ignore[override]
        if self.head is None:
            return self._language_model[0](input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels).loss
        hidden = classifier.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        masked = labels != -100
        if not bool(masked.any()):  # a batch of texts too short to mask anything
            return hidden.sum() * 0.0
        return F.cross_entropy(self.head(hidden[masked]).float(), labels[masked])


class MaskedText(Task):
    """The pretext task while pre-training: masked texts; the metric is the masked-token loss."""

    metrics: ClassVar[dict[str, str]] = {"loss": "min"}
    headline: ClassVar[str] = "loss"

    def __init__(self, objective: MaskedLM) -> None:
        self.objective = objective

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> Tensor:
        return self.objective(model, inputs, targets)

    def outputs(self, model: nn.Module, inputs: Any) -> Any:
        return model, inputs  # the loss needs the labels: scored in `score`

    def score(self, outputs: Any, targets: Any) -> dict[str, float]:
        model, inputs = outputs
        with torch.no_grad():
            return {"loss": self.objective(model, inputs, targets).item() * len(targets)}
