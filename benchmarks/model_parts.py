"""A packaged pipeline folder in parts small enough to come back from the device, and whole again here.

A device call returns at most 8 files of 16 MiB, 64 MiB in all (/work/.library/device/README.md's limits), and the
GPU run's width-128 network is 121 MB in bfloat16, its guide as much again. So `pack` cuts each model's weights into
shards with huggingface_hub's `split_torch_state_dict_into_shards`, puts the rest of the folder in one tar file, and
plans the files into parts that each fit one call's return: four at width 128, one at the shipped width 64. Each
part carries `manifest.json` (every file's size and SHA-256, the parts, and the SHA-256 of each model's weights file),
and `unpack` rebuilds the folder byte for byte, checked against it. The weights travel as they are: int8 with a scale
per output channel would halve the parts, but it moved the shipped model's detail mode by -0.46 dB on the held-out
photos (docs/quality.md, "The GPU run").

    # on the device, in the call that trains (gpu_quality.py --keep-model /tmp/kept does this), then one short call
    # per part, at once (a warm machine keeps what a call wrote for 30 s after it; a fresh one holds nothing):
    python3 benchmarks/model_parts.py pack MODEL /tmp/kept
    python3 benchmarks/model_parts.py send /tmp/kept --part 1 --output $OUT
    # here, on the returned folders:
    python benchmarks/model_parts.py unpack RETURNED_1 RETURNED_2 RETURNED_3 RETURNED_4 --output MODEL
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from typing import Dict, Iterable, List, Sequence

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

MIB = 1 << 20
WEIGHTS = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained names a model's weights
MANIFEST = "manifest.json"
FOLDER_FILES = "pipeline_files.tar"  # everything in the pipeline folder but the weights
HEADER_BYTES_PER_TENSOR = 100  # a safetensors header's entry beside the name: dtype, shape, offsets
MANIFEST_ROOM = 64 * 1024  # bytes each part keeps free for its manifest


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def merged(paths: Iterable[str]) -> Dict[str, torch.Tensor]:
    """The tensors of several safetensors files in one dict."""
    tensors: Dict[str, torch.Tensor] = {}
    for path in paths:
        tensors.update(load_file(path))
    return tensors


def components(model_dir: str) -> List[str]:
    """The subfolders of a pipeline folder that hold model weights (unet, guidance_unet)."""
    return sorted(name for name in os.listdir(model_dir) if os.path.isfile(os.path.join(model_dir, name, WEIGHTS)))


def plan_parts(sizes: Dict[str, int], max_file_bytes: int, max_part_bytes: int, max_part_files: int) -> List[List[str]]:
    """`sizes`' files, in order, grouped into parts of at most `max_part_files` files and `max_part_bytes` bytes,
    each with room for the manifest."""
    parts: List[List[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if size > max_file_bytes:
            raise ValueError(f"{name} is {size} bytes, over the {max_file_bytes} a returned file may have")
        if parts[-1] and (used + size > max_part_bytes - MANIFEST_ROOM or len(parts[-1]) + 2 > max_part_files):
            parts.append([])
            used = 0
        parts[-1].append(name)
        used += size
    return parts


def pack(
    model_dir: str,
    parts_dir: str,
    max_file_bytes: int = 16 * MIB,
    max_part_bytes: int = 64 * MIB,
    max_part_files: int = 8,
) -> dict:
    """Write `model_dir` into `parts_dir` (which must not exist) as parts that each fit one device call's return.
    Returns the manifest."""
    if os.path.exists(parts_dir):
        raise FileExistsError(f"{parts_dir} exists: pack writes a new folder")
    names = components(model_dir)
    if not names:
        raise FileNotFoundError(f"{model_dir} holds no <component>/{WEIGHTS}: not a pipeline folder")
    staging = tempfile.mkdtemp(prefix=".parts-", dir=os.path.dirname(os.path.abspath(parts_dir)))
    try:
        with tarfile.open(os.path.join(staging, FOLDER_FILES), "w") as archive:
            for root, folders, files in os.walk(model_dir):
                folders.sort()
                for file in sorted(files):
                    path = os.path.join(root, file)
                    relative = os.path.relpath(path, model_dir)
                    if os.path.dirname(relative) not in names or file != WEIGHTS:
                        archive.add(path, arcname=relative)
        shards: Dict[str, List[str]] = {}
        for name in names:
            tensors = load_file(os.path.join(model_dir, name, WEIGHTS))
            header = sum(len(key) + HEADER_BYTES_PER_TENSOR for key in tensors)  # at most, in any of the shards
            split = split_torch_state_dict_into_shards(
                tensors, filename_pattern=name + "{suffix}.safetensors", max_shard_size=max_file_bytes - header
            )
            for file, keys in split.filename_to_tensors.items():
                save_file({key: tensors[key] for key in keys}, os.path.join(staging, file))
            shards[name] = list(split.filename_to_tensors)
        files = [FOLDER_FILES, *(file for name in names for file in shards[name])]
        sizes = {file: os.path.getsize(os.path.join(staging, file)) for file in files}
        manifest = {
            "format": 1,
            "shards": shards,
            "weights_sha256": {name: sha256(os.path.join(model_dir, name, WEIGHTS)) for name in names},
            "files": {file: {"bytes": sizes[file], "sha256": sha256(os.path.join(staging, file))} for file in files},
            "parts": plan_parts(sizes, max_file_bytes, max_part_bytes, max_part_files),
        }
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as file:
            json.dump(manifest, file, indent=1)
        if os.path.getsize(os.path.join(staging, MANIFEST)) > MANIFEST_ROOM:
            raise ValueError("the manifest outgrew the room each part keeps for it")
        os.replace(staging, parts_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def send(parts_dir: str, part: int, output: str) -> List[str]:
    """Copy part `part` (1-based) of `parts_dir` into `output` (a call's $OUT); the files copied."""
    manifest = json.load(open(os.path.join(parts_dir, MANIFEST), encoding="utf-8"))
    if not 1 <= part <= len(manifest["parts"]):
        raise ValueError(f"--part {part}: {parts_dir} has parts 1 to {len(manifest['parts'])}")
    os.makedirs(output, exist_ok=True)
    files = [MANIFEST, *manifest["parts"][part - 1]]
    for file in files:
        shutil.copyfile(os.path.join(parts_dir, file), os.path.join(output, file))
    return files


def unpack(folders: Iterable[str], output: str) -> dict:
    """Rebuild the pipeline folder from the returned parts in `folders` (any order) into `output` (which must not
    exist), every file and each model's weights checked against the manifest. Returns the manifest."""
    folders = list(folders)
    if os.path.exists(output):
        raise FileExistsError(f"{output} exists: unpack writes a new folder")
    manifests = [os.path.join(folder, MANIFEST) for folder in folders]
    for path in manifests:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: each returned part carries the manifest")
    manifest = json.load(open(manifests[0], encoding="utf-8"))
    if any(json.load(open(path, encoding="utf-8")) != manifest for path in manifests[1:]):
        raise ValueError("the returned parts come from different packs (their manifests differ)")
    found = {file: os.path.join(folder, file) for folder in folders for file in os.listdir(folder)}
    missing = [file for file in manifest["files"] if file not in found]
    if missing:
        parts = sorted({index + 1 for index, part in enumerate(manifest["parts"]) for file in part if file in missing})
        raise FileNotFoundError(f"parts {parts} of {len(manifest['parts'])} are missing (files {', '.join(missing)})")
    for file, expected in manifest["files"].items():
        if sha256(found[file]) != expected["sha256"]:
            raise ValueError(f"{found[file]} does not match its manifest's SHA-256: a broken transfer")
    staging = tempfile.mkdtemp(prefix=".unpack-", dir=os.path.dirname(os.path.abspath(output)))
    try:
        with tarfile.open(found[FOLDER_FILES]) as archive:
            archive.extractall(staging, filter="data")
        for name, shards in manifest["shards"].items():
            weights = os.path.join(staging, name, WEIGHTS)
            # safetensors orders tensors by dtype and name, so this is the packed file, byte for byte
            save_file(merged(found[file] for file in shards), weights, metadata={"format": "pt"})
            if sha256(weights) != manifest["weights_sha256"][name]:
                raise ValueError(f"{name}'s rebuilt weights differ from the packed ones")
        os.chmod(staging, 0o755)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="a pipeline folder into parts")
    packing.add_argument("model", help="the packaged pipeline folder")
    packing.add_argument("parts", help="a new folder for the parts")
    sending = commands.add_parser("send", help="one part into a call's $OUT")
    sending.add_argument("parts")
    sending.add_argument("--part", type=int, required=True, help="1-based")
    sending.add_argument("--output", required=True)
    unpacking = commands.add_parser("unpack", help="the returned parts into a pipeline folder")
    unpacking.add_argument("returned", nargs="+", help="the folders the calls returned, one per part")
    unpacking.add_argument("--output", required=True, help="a new folder for the pipeline")
    args = parser.parse_args(argv)
    if args.command == "pack":
        manifest = pack(args.model, args.parts)
        for index in range(len(manifest["parts"])):
            print(f"python3 benchmarks/model_parts.py send {args.parts} --part {index + 1} --output $OUT")
    elif args.command == "send":
        print("\n".join(send(args.parts, args.part, args.output)))
    else:
        unpack(args.returned, args.output)
        print(f"unpacked {len(args.returned)} parts -> {args.output}")


if __name__ == "__main__":
    sys.exit(main())
