"""Load an exported artifact the way a deployment would, WITHOUT effitrain, run the test inputs
through it and time it. `effitrain export` runs this file's source in a fresh interpreter
(`python -c`, from an empty folder) and asserts effitrain was never imported.

Argument: a JSON file {format, artifact, inputs (.npz by input name), input_names, batch_size,
latency_batch, warmup, repeats, threads, cuda, result (where to write the JSON result)}.
Result: {predictions | tensors, latency_ms, runtime, effitrain_imported}.
"""

import hashlib
import json
import statistics
import sys
import time

import numpy as np


def _onnx(spec):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if spec["threads"]:
        options.intra_op_num_threads = spec["threads"]
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if spec["cuda"] and "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
    session = ort.InferenceSession(spec["artifact"], options, providers=providers)
    return (lambda batch: session.run(["logits"], batch)[0]), f"onnxruntime {ort.__version__} ({session.get_providers()[0]})"


def _torch_threads(spec):
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.set_grad_enabled(False)
    return torch


def _torchscript(spec):
    torch = _torch_threads(spec)
    module = torch.jit.load(spec["artifact"], map_location="cpu").eval()
    names = spec["input_names"]
    return (lambda batch: module(*[torch.from_numpy(batch[name]) for name in names]).numpy()), f"torch.jit {torch.__version__}"


def _hf(spec):
    torch = _torch_threads(spec)
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(spec["artifact"], local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["artifact"], local_files_only=True)
    assert tokenizer("effitrain export check")["input_ids"], "the exported tokenizer encodes nothing"
    runtime = f"transformers {transformers.__version__} ({type(model).__name__}, {type(tokenizer).__name__})"
    return (lambda batch: model(**{name: torch.from_numpy(value) for name, value in batch.items()}).logits.numpy()), runtime


def _tensors(spec):
    """safetensors: the file read by the safetensors package alone, as name -> sha256 of bytes."""
    import safetensors
    from safetensors.numpy import load_file

    tensors = load_file(spec["artifact"])
    digests = {name: hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest() for name, value in tensors.items()}
    return digests, f"safetensors {safetensors.__version__}"


def main(path):
    spec = json.load(open(path))
    result = {}
    if spec["format"] == "safetensors":
        result["tensors"], result["runtime"] = _tensors(spec)
    else:
        run, result["runtime"] = {"onnx": _onnx, "torchscript": _torchscript, "hf": _hf}[spec["format"]](spec)
        inputs = np.load(spec["inputs"])
        arrays = {name: inputs[name] for name in spec["input_names"]}
        count, size = len(arrays[spec["input_names"][0]]), spec["batch_size"]
        predictions = []
        for start in range(0, count, size):
            logits = run({name: value[start:start + size] for name, value in arrays.items()})
            predictions += np.asarray(logits).argmax(-1).tolist()
        timed = {name: value[:spec["latency_batch"]] for name, value in arrays.items()}
        timings = []
        for index in range(spec["warmup"] + spec["repeats"]):
            start = time.perf_counter()
            run(timed)
            if index >= spec["warmup"]:
                timings.append((time.perf_counter() - start) * 1000.0)
        result.update(predictions=predictions, latency_ms=statistics.median(timings), latency_batch=len(next(iter(timed.values()))))
    result["effitrain_imported"] = any(name == "effitrain" or name.startswith("effitrain.") for name in sys.modules)
    json.dump(result, open(spec["result"], "w"))


if __name__ == "__main__":
    main(sys.argv[1])
