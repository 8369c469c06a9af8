"""Checks on what the project writes to disk."""

from __future__ import annotations

import zipfile
from pathlib import Path


def assert_no_pickles(root: Path) -> None:
    """No file under ``root`` is a pickle (protocol 2-5 header) or a ``torch.save`` zip archive.

    Pickles run code when loaded; the project's contract is safetensors, ONNX protobufs and JSON only.
    """
    for path in root.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), f"{path} looks like a pickle"
            assert not zipfile.is_zipfile(path), f"{path} is a zip archive (torch.save writes those)"
