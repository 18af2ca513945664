"""Export formats, one class each in a table keyed by name: what a format writes, and which
models it cannot take (one clause, so the caller can list the formats that can).

Every artifact takes the model's inputs as positional tensors named in `input_names`
("inputs" for a tensor model, the tokenizer's keys such as input_ids/attention_mask for text)
and returns the logits.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from effitrain.batch import forward
from effitrain.compress.embeddings import TrimmedEmbedding, trim_tokenizer_file

OPTIONAL = "pip install -e \".[deploy]\""


class LogitsOnly(nn.Module):
    """Positional tensors in (in `input_names` order), logits out: the calling convention of
    every exported graph."""

    def __init__(self, model: nn.Module, input_names: list[str], keyed: bool) -> None:
        super().__init__()
        self.model, self.input_names, self.keyed = model, input_names, keyed

    def forward(self, *tensors: Tensor) -> Tensor:
        inputs = dict(zip(self.input_names, tensors)) if self.keyed else tensors[0]
        return forward(self.model, inputs)


def input_names(example: Any) -> tuple[list[str], bool]:
    """(names of the model's input tensors, whether the model takes them as keywords)."""
    if isinstance(example, dict):
        return list(example), True
    return ["inputs"], False


def positional(example: Any) -> tuple[Tensor, ...]:
    return tuple(example.values()) if isinstance(example, dict) else (example,)


def is_transformers(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config") and type(model).__module__.startswith("transformers.")


class Format:
    """One export format.

    Class attributes:
        name: the `--format` value.
        suffix: the artifact's file suffix ("" for a folder).
        packages: what writing and loading it needs beyond torch (checked before exporting).
    """

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    packages: ClassVar[tuple[str, ...]] = ()

    def refusal(self, model: nn.Module) -> str | None:
        """Why this model cannot be written in this format (one clause), or None."""
        return None

    def write(self, model: nn.Module, example: Any, path: Path) -> dict[str, Any]:
        """Write the artifact at `path` (a text model's tokenizer is saved by `save_tokenizer`).

        Returns:
            Facts for the export record (e.g. the ONNX opset).
        """
        raise NotImplementedError

    def save_tokenizer(self, model: nn.Module, tokenizer: Any, folder: Path) -> None:
        """Save the tokenizer that produces the artifact's inputs."""
        tokenizer.save_pretrained(str(folder))

    def parity_inputs(self, model: nn.Module, arrays: dict[str, Any]) -> dict[str, Any]:
        """The run's test inputs as the artifact takes them (the tokenizer's ids, by default)."""
        return arrays


class Onnx(Format):
    name, suffix, packages = "onnx", ".onnx", ("onnxruntime", "onnx", "onnxscript")

    def refusal(self, model: nn.Module) -> str | None:
        from effitrain.export.onnx_graph import unexportable

        return unexportable(model)

    def write(self, model: nn.Module, example: Any, path: Path) -> dict[str, Any]:
        from effitrain.export.onnx_graph import OPSET, onnx_ready, write_onnx

        names, keyed = input_names(example)
        write_onnx(LogitsOnly(onnx_ready(model), names, keyed).eval(), positional(example), names, path)
        return {"opset": OPSET}


class TorchScript(Format):
    name, suffix = "torchscript", ".pt"

    def write(self, model: nn.Module, example: Any, path: Path) -> dict[str, Any]:
        names, keyed = input_names(example)
        wrapped = LogitsOnly(model, names, keyed).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on Python control flow; parity below is the real check
            traced = torch.jit.trace(wrapped, positional(example), check_trace=False)
        traced.save(str(path))
        return {}


def _heads(model: nn.Module) -> list[int]:
    from effitrain.prune.structured import attention_modules

    return [int(module.num_attention_heads) for module in attention_modules(model)]


class HuggingFace(Format):
    name, packages = "hf", ("transformers",)

    def refusal(self, model: nn.Module) -> str | None:
        if not is_transformers(model):
            return f"{type(model).__name__} is not a transformers model"
        embedding = model.get_input_embeddings()
        if not isinstance(embedding.rows if isinstance(embedding, TrimmedEmbedding) else embedding, nn.Embedding):
            return "its word embeddings are factorised, which a transformers config cannot describe"
        foreign = [name for name, module in model.named_modules()
                   if not type(module).__module__.startswith(("transformers.", "torch.nn.")) and module is not embedding]
        if foreign:
            return f"its layer {foreign[0]} is {type(model.get_submodule(foreign[0])).__name__}, which a transformers config cannot describe"
        heads = _heads(model)
        if heads and any(count != model.config.num_attention_heads for count in heads):
            return (f"it has pruned attention heads ({heads} per layer of {model.config.num_attention_heads}); "
                    f"transformers removed `pruned_heads`, so its config cannot express them")
        widths = sorted({module.dense.out_features for name, module in model.named_modules() if name.endswith(".intermediate")})
        if len(widths) > 1:
            return f"its FFN widths differ per layer ({', '.join(map(str, widths))}); a transformers config holds one intermediate_size"
        mismatch = _shape_mismatch(model, _config(model))
        if mismatch:
            return f"its tensor {mismatch} does not fit the shapes its transformers config implies"
        return None

    def write(self, model: nn.Module, example: Any, path: Path) -> dict[str, Any]:
        config = _config(model)
        copied = copy.deepcopy(model).cpu()
        facts: dict[str, Any] = {"intermediate_size": getattr(config, "intermediate_size", None)}
        embedding = copied.get_input_embeddings()
        if isinstance(embedding, TrimmedEmbedding):  # a plain table of the kept rows; the tokenizer emits row ids
            copied.set_input_embeddings(embedding.rows)
            config.vocab_size = embedding.rows.num_embeddings
            if getattr(config, "pad_token_id", None) is not None:
                config.pad_token_id = int(embedding.remap[config.pad_token_id])
            facts.update(vocab_kept=config.vocab_size, vocab_size=embedding.num_embeddings,
                         tokenizer="trimmed WordPiece: words with a dropped piece are split into kept pieces (the run's model read such pieces as [UNK])")
        copied.config = config
        copied.save_pretrained(str(path))
        return facts

    def save_tokenizer(self, model: nn.Module, tokenizer: Any, folder: Path) -> None:
        tokenizer.save_pretrained(str(folder))
        embedding = model.get_input_embeddings()
        if isinstance(embedding, TrimmedEmbedding):
            trim_tokenizer_file(folder / "tokenizer.json", embedding, tokenizer.unk_token_id)

    def parity_inputs(self, model: nn.Module, arrays: dict[str, Any]) -> dict[str, Any]:
        embedding = model.get_input_embeddings()
        if not isinstance(embedding, TrimmedEmbedding):
            return arrays
        remap = embedding.remap.cpu().numpy()
        return {**arrays, "input_ids": remap[arrays["input_ids"]].astype(arrays["input_ids"].dtype)}


def _config(model: nn.Module) -> Any:
    """The model's transformers config with the FFN width it has now (structured pruning shrinks it)."""
    config = copy.deepcopy(model.config)
    widths = {module.dense.out_features for name, module in model.named_modules() if name.endswith(".intermediate")}
    if len(widths) == 1 and hasattr(config, "intermediate_size"):
        config.intermediate_size = widths.pop()
    return config


def _shape_mismatch(model: nn.Module, config: Any) -> str | None:
    """The first tensor whose shape differs from a fresh model built from `config` (on the meta device)."""
    with torch.device("meta"):
        fresh = type(model)(config)
    expected = {name: tuple(tensor.shape) for name, tensor in fresh.state_dict().items()}
    for name, tensor in model.state_dict().items():
        if name in expected and expected[name] != tuple(tensor.shape):
            return f"{name} {tuple(tensor.shape)} (config: {expected[name]})"
    return None


class Safetensors(Format):
    name, suffix, packages = "safetensors", ".safetensors", ("safetensors",)

    def refusal(self, model: nn.Module) -> str | None:
        for name, tensor in model.state_dict().items():
            if isinstance(tensor, Tensor) and tensor.is_quantized:
                return f"its tensor {name} is a torch quantized tensor, which safetensors cannot hold"
        return None

    def write(self, model: nn.Module, example: Any, path: Path) -> dict[str, Any]:
        from effitrain.checkpoint import save_weights

        save_weights(model, path)
        return {}


FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (Onnx(), TorchScript(), HuggingFace(), Safetensors())}


def default_format(model: nn.Module) -> str:
    """ONNX where the model has an ONNX graph, else TorchScript."""
    return "onnx" if FORMATS["onnx"].refusal(model) is None else "torchscript"
