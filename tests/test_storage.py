"""Deep-Compression storage: exact round trips of every encoding and dtype, files that shrink
with sparsity and sharing, damaged files refused in one line, clustering that keeps pruned
zeros, and the prune/cluster stages reloading compressed models bit for bit in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from effitrain.compress import storage
from effitrain.compress.cluster import ClusteredWeight
from effitrain.errors import EffitrainError

from conftest import run_cli_batch, assert_refused, read_summary, run_cli

TINY = ["data=synthetic", "model.channels=[8,16]", "model.hidden=16", "trainer.max_epochs=2", "measure.repeats=10", "measure.warmup=1"]


def test_every_encoding_and_dtype_round_trips_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    sparse = torch.randn(64, 32)
    sparse[torch.rand(64, 32) < 0.9] = 0
    shared = torch.tensor([0.0, 0.5, -0.25])[torch.randint(0, 3, (40, 40))]
    state = {
        "sparse": sparse, "shared": shared, "dense": torch.randn(100), "bf16": torch.randn(33).to(torch.bfloat16),
        "half": torch.randn(7).half(), "int8": torch.randint(-128, 127, (50,), dtype=torch.int8), "uint8": torch.zeros(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(5), "empty": torch.zeros(0, 3), "odd": torch.tensor([0.0, 1.0, 0.0]),
    }
    path = tmp_path / "m.dcz"
    counts = storage.write(state, path)
    assert set(counts) == {"raw", "sparse", "shared"}
    back = storage.read(path)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name].view(torch.int16) if tensor.dtype == torch.bfloat16 else back[name],
                           tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor), name
    assert storage.shapes(path)["sparse"] == (64, 32)


def test_file_size_shrinks_with_sparsity(tmp_path) -> None:
    torch.manual_seed(0)
    sizes = []
    for sparsity in (0.0, 0.5, 0.9, 0.98):
        weight = torch.randn(256, 256)
        weight[torch.rand(256, 256) < sparsity] = 0
        storage.write({"w": weight}, tmp_path / f"{sparsity}.dcz")
        sizes.append((tmp_path / f"{sparsity}.dcz").stat().st_size)
    assert sizes == sorted(sizes, reverse=True) and sizes[2] < 0.2 * sizes[0]
    assert not storage.pack({"w": torch.randn(64, 64)}).worth_it
    assert storage.pack({"w": weight}).worth_it


def test_offset_packed_integer_zeros_are_masked_like_float_zeros(tmp_path) -> None:
    """weight_only packs an int8 level q as the byte q + 128: a pruned weight is 128, not 0."""
    torch.manual_seed(0)
    levels = torch.randint(-127, 128, (128, 128), dtype=torch.int16)
    levels[torch.rand(128, 128) < 0.9] = 0
    state = {"packed": (levels + 128).to(torch.uint8), "shifted": (levels - 3).to(torch.int8), "wide": levels + 1000, "plain": levels.to(torch.int8)}
    storage.write(state, tmp_path / "m.dcz")
    back = storage.read(tmp_path / "m.dcz")
    assert all(torch.equal(back[name], tensor) for name, tensor in state.items())
    assert (tmp_path / "m.dcz").read_bytes()[4] == 2  # the background column
    alone = {name: storage.pack({name: tensor}) for name, tensor in state.items()}
    assert all(packed.worth_it for packed in alone.values())
    assert abs(len(alone["packed"].body) - len(alone["plain"].body)) <= 8  # as small as the same zeros stored as 0
    # what the stages go by: a pruned layer quantized weight_only has something to compress
    from effitrain.checkpoint import compresses
    from effitrain.quant.weight_only import QuantizedWeight

    layer = nn.Linear(256, 128)
    with torch.no_grad():
        layer.weight[torch.rand(128, 256) < 0.9] = 0
    assert compresses(QuantizedWeight(layer, 8, "symmetric", True)) and not compresses(QuantizedWeight(nn.Linear(256, 128), 8, "symmetric", True))
    storage.write({"w": levels.float()}, tmp_path / "f.dcz")
    assert (tmp_path / "f.dcz").read_bytes()[4] == 1  # no background: the version 1 bytes, readable by older effitrain


def test_damaged_files_fail_with_one_line(tmp_path) -> None:
    path = tmp_path / "m.dcz"
    weight = torch.randn(64, 64)
    weight[weight.abs() < 1] = 0
    storage.write({"w": weight}, path)
    blob = path.read_bytes()
    cases = {"truncated": blob[: len(blob) // 2], "flipped": blob[:-20] + bytes([blob[-20] ^ 0xFF]) + blob[-19:],
             "not ours": b"PK\x03\x04" + blob[4:], "empty": b""}
    for label, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(EffitrainError) as caught:
            storage.read(path)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message, label
        assert any(word in message for word in ("damaged", "truncated", "not an effitrain")), (label, message)


def test_clustering_a_pruned_layer_keeps_its_zeros_through_fine_tuning() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight[torch.rand(16, 32) < 0.8] = 0
    zeros = layer.weight == 0
    clustered = ClusteredWeight(layer, 16)
    assert torch.equal(clustered.weight() == 0, zeros) and len(clustered.codebook) == 16
    optimizer = torch.optim.SGD(clustered.parameters(), lr=0.5)
    for _ in range(3):
        clustered(torch.randn(8, 32)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(clustered.weight() == 0, zeros)  # the shared values moved, the zeros did not


FRESH = """
import json, sys, torch
from pathlib import Path
from effitrain.runs import load_run_model
for run_dir, stage, out in zip(*[iter(sys.argv[1:])] * 3):
    model, data = load_run_model(Path(run_dir), stage)
    with torch.no_grad():
        logits = torch.cat([model(inputs) for inputs, _ in data.test])
    torch.save(logits, out)
"""


def _fresh_logits(*jobs: tuple[Path, str, Path]) -> list[torch.Tensor]:
    """Each (run folder, stage, output file): the stage's test logits, rebuilt in one fresh process."""
    arguments = [str(part) for job in jobs for part in job]
    done = subprocess.run([sys.executable, "-c", FRESH, *arguments], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [torch.load(out) for _, _, out in jobs]


def test_prune_and_cluster_store_compressed_and_reload_bit_for_bit(workdir) -> None:
    common = ["run", "recipe=deep_compression_digits", *TINY, "stage.pruned.trainer.max_epochs=2", "stage.clustered.trainer.max_epochs=1",
              "measure.final_retime=false"]
    compressed = run_cli(*common, "hydra.run.dir=packed", cwd=workdir, timeout=300)
    assert compressed.returncode == 0, compressed.stderr[-2000:]
    plain = run_cli(*common, "stage.pruned.storage=plain", "stage.clustered.storage=plain", "hydra.run.dir=plain", cwd=workdir, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    packed, flat = workdir / "packed", workdir / "plain"
    assert sorted(path.name for path in (packed / "checkpoints").glob("0*")) == ["00_dense.safetensors", "01_pruned.dcz", "02_clustered.dcz"]
    rows = {row["name"]: row["metrics"] for row in read_summary(packed)["stages"]}
    plain_rows = {row["name"]: row["metrics"] for row in read_summary(flat)["stages"]}
    stages = ("pruned", "clustered")
    logits = _fresh_logits(*[(run, stage, workdir / f"{stage}_{run.name}.pt") for stage in stages for run in (packed, flat)])
    for index, stage in enumerate(stages):
        assert rows[stage]["size_bytes"] == (packed / "checkpoints" / f"0{1 if stage == 'pruned' else 2}_{stage}.dcz").stat().st_size
        assert rows[stage]["size_bytes"] < 0.5 * plain_rows[stage]["size_bytes"]
        assert rows[stage]["accuracy"] == plain_rows[stage]["accuracy"]
        # a fresh process rebuilds the compressed model and computes exactly the plain one's logits
        assert torch.equal(logits[2 * index], logits[2 * index + 1])
        predictions = json.loads((packed / "predictions" / f"{stage}.json").read_text())["predictions"]
        assert logits[2 * index].argmax(1).tolist() == predictions
    # a damaged compressed file: one line, exit 2, the folder left as it is
    target = packed / "checkpoints" / "02_clustered.dcz"
    target.write_bytes(target.read_bytes()[:100])
    broken = run_cli("export", "packed:clustered", "--format", "torchscript", "-o", "c.pt", cwd=workdir, timeout=300)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr, broken.stderr[-2000:]
    assert "02_clustered.dcz: damaged or truncated" in broken.stderr and len(broken.stderr.strip().splitlines()) == 1
    assert not (workdir / "c.pt").exists()


def test_a_pruned_model_quantized_weight_only_stores_compressed_and_reloads_bit_for_bit(workdir) -> None:
    common = ["run", "recipe=prune_gradual_digits", *TINY, "stage.dense.trainer.max_epochs=1", "stage.pruned.trainer.max_epochs=1",
              "+stage@stage.int8=quantize", "stage.int8.backend=weight_only", "measure.final_retime=false", "report=false",
              # from the pruned model as the prune stage left it, not as int8 then converted it in place
              "+stage@stage.int4=quantize", "stage.int4.backend=weight_only", "stage.int4.bits=4", "stage.int4.source=pruned"]
    runs = {storage_kind: workdir / storage_kind for storage_kind in ("auto", "plain")}
    for storage_kind, folder in runs.items():
        result = run_cli(*common, f"stage.int8.storage={storage_kind}", f"hydra.run.dir={folder.name}", cwd=workdir, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    sizes = {kind: {row["name"]: row["metrics"]["size_bytes"] for row in read_summary(folder)["stages"]} for kind, folder in runs.items()}
    assert (runs["auto"] / "checkpoints" / "02_int8.dcz").stat().st_size == sizes["auto"]["int8"]
    assert sizes["auto"]["int8"] < 0.6 * sizes["plain"]["int8"]  # the 90% pruned zeros, skipped in their packed form too
    assert sizes["auto"]["int4"] < sizes["auto"]["int8"] and (runs["auto"] / "checkpoints" / "03_int4.dcz").is_file()
    compressed, plain = _fresh_logits(*[(folder, "int8", workdir / f"{kind}.pt") for kind, folder in runs.items()])
    assert torch.equal(compressed, plain)


BAD_STORAGE = [
    ("stage.pruned.storage=zip", "stage.pruned.storage = 'zip' is not allowed (allowed: auto, compressed, plain)"),
    ("stage.pruned.sparsity=0", "stage.pruned.storage = 'compressed' is not allowed (allowed: auto, plain (sparsity 0 prunes nothing: nothing sparse to store))"),
]


def test_quantizing_a_dense_model_into_compressed_storage_is_refused_before_the_run(workdir) -> None:
    folder, result = run_cli_batch([["run", "recipe=baseline", *TINY, "+stage@stage.small=quantize", "stage.small.storage=compressed"]], workdir)[0]
    assert_refused(result, "stage.small.storage = 'compressed': the SmallCNN this stage quantizes has no sparse or shared weights the format can hold, "
                           "and no stage before it makes any (allowed: auto, plain, or a prune or cluster stage first)", folder)


@pytest.mark.parametrize("override,message", BAD_STORAGE, ids=[case[0] for case in BAD_STORAGE])
def test_storage_bad_input_is_one_line(workdir, override, message) -> None:
    folder, result = run_cli_batch([["run", "recipe=deep_compression_digits", *TINY, override]], workdir)[0]
    assert_refused(result, message, folder)
