"""The example Triton model repository (examples/triton) matches the model that
``fasterrcnn-ext export --fixed-shape --format torchscript`` writes: the file layout, and every input and output of
config.pbtxt (name, position, data type, rank, fixed sizes) against what the exported TorchScript file takes and
returns. Triton itself does not run here."""

import re
import warnings
from pathlib import Path

import torch

from fasterrcnn_ext.engine.export import FIXED_SHAPE_OUTPUTS, export_detector

from ..models.test_export import spread_tiny

REPOSITORY = Path(__file__).parents[2] / "examples" / "triton" / "model_repository"
TYPES = {"TYPE_FP32": torch.float32, "TYPE_INT64": torch.int64, "TYPE_UINT8": torch.uint8}


def tensors(config: str, section: str) -> list[dict]:
    """The {name, data_type, dims} entries of config.pbtxt's ``input`` or ``output`` list."""
    body = re.search(rf"^{section} \[(.*?)^\]", config, re.M | re.S).group(1)
    entries = []
    for block in re.findall(r"\{(.*?)\}", body, re.S):
        entries.append({"name": re.search(r'name: "([^"]+)"', block).group(1),
                        "data_type": re.search(r"data_type: (\w+)", block).group(1),
                        "dims": [int(d) for d in re.search(r"dims: \[([^\]]*)\]", block).group(1).split(",")]})
    return entries


def test_repository_layout_matches_the_exported_model(tmp_path):
    model_dir = REPOSITORY / "fasterrcnn"
    assert (model_dir / "1").is_dir() and (model_dir / "config.pbtxt").is_file()
    config = (model_dir / "config.pbtxt").read_text()
    assert re.search(r'^name: "fasterrcnn"$', config, re.M)  # Triton requires the folder's name
    assert re.search(r'^backend: "pytorch"$', config, re.M) and re.search(r"^max_batch_size: 0$", config, re.M)
    inputs, outputs = tensors(config, "input"), tensors(config, "output")

    out = export_detector(spread_tiny(), "torchscript", str(tmp_path / "model.pt"), (192, 256), fixed_shape=True,
                          log=lambda *_: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(out)
    assert len(inputs) == 1 and inputs[0]["name"] == "images__0"
    assert TYPES[inputs[0]["data_type"]] == torch.float32 and inputs[0]["dims"] == [-1, 3, -1, -1]
    forward_args = [a.name for a in model.forward.schema.arguments][1:]  # after self
    assert forward_args == ["images"]
    with torch.no_grad():
        results = model(torch.rand(2, 3, 192, 256))
    assert len(outputs) == len(results) == len(FIXED_SHAPE_OUTPUTS)
    for entry, result, name in zip(outputs, results, FIXED_SHAPE_OUTPUTS):
        assert entry["name"] == f"{name}__{FIXED_SHAPE_OUTPUTS.index(name)}"
        assert TYPES[entry["data_type"]] == result.dtype, entry
        assert len(entry["dims"]) == result.dim(), entry
        assert all(d == -1 or d == size for d, size in zip(entry["dims"], result.shape)), entry


def test_readme_preloads_the_library_by_its_path():
    text = (REPOSITORY.parent / "README.md").read_text()
    assert "LD_PRELOAD=$(python -c \"import fasterrcnn_ext; print(fasterrcnn_ext.library_path())\")" in text
    assert "--fixed-shape --format torchscript" in text and "model_repository/fasterrcnn/1/model.pt" in text
