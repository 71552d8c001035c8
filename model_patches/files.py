"""Reading the files users download, with errors that name the input, the file, the cause and the fix.

Large downloads fail in a few recognisable ways: a file cut short (an interrupted or full-disk
download), an empty file, or an HTML page saved under the model's name (a gated repository's
login page, an error page, a wrong "blob" link). The libraries below then raise errors that
name neither the file nor the fix (safetensors' own wording changes between versions, so
ComfyUI's friendly message does not fire either). Each reader here looks at the file first and
says which of these it is.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile

import comfy.utils

from ..cache_core.errors import InputError

_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024      # the format's own bound on the JSON header


def _html(head: bytes) -> bool:
    text = head.lstrip().lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text[:256]


def _problem(path: str) -> str | None:
    """What is wrong with a downloaded file, in a user's words (None: nothing visible from outside)."""
    if not os.path.isfile(path):
        return "does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes): the download did not finish"
    with open(path, "rb") as f:
        head = f.read(512)
    if _html(head):
        return ("is an HTML page, not model data: a failed or gated download (the site sent a login or error page; "
                "accept the model's licence while logged in, or use the file's 'resolve'/download link)")
    return None


def _safetensors_problem(path: str) -> str | None:
    problem = _problem(path)
    if problem:
        return problem
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"is truncated ({size} bytes): the download did not finish"
        (n,) = struct.unpack("<Q", raw)
        if n > _SAFETENSORS_HEADER_LIMIT:
            return "is not a safetensors file (its first bytes are no safetensors header)"
        if 8 + n > size:
            return f"is truncated ({size} bytes, its header alone needs {8 + n}): the download did not finish"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "is not a safetensors file (its header is not readable)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and "data_offsets" in t]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"is truncated: it has {size:,} of its {need:,} bytes (the download did not finish)"
    return None


def _refuse(input_name: str, path: str, problem: str, fix: str):
    raise InputError(input_name, f"{os.path.basename(path)} ({path}) {problem}: {fix}")


def load_safetensors(path: str, input_name: str, fix: str = "download it again") -> dict:
    """All tensors of a .safetensors file (ComfyUI's loader), or an error naming the file and cause."""
    problem = _safetensors_problem(path) if path.endswith(".safetensors") else _problem(path)
    if problem:
        _refuse(input_name, path, problem, fix)
    try:
        return comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:                      # whatever the library says, say which file and what to do
        problem = f"could not be read ({type(e).__name__}: {str(e)[:200]})"
    _refuse(input_name, path, problem, fix)     # outside the handler: no library frames kept alive


def load_json(path: str, input_name: str, fix: str = "download it again") -> object:
    """A JSON file (an index, a config), or an error naming the file and cause."""
    problem = _problem(path)
    if problem:
        _refuse(input_name, path, problem, fix)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        problem = "is not a text (JSON) file"
    except json.JSONDecodeError as e:
        problem = f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); it may be cut short or edited by hand"
    _refuse(input_name, path, problem, fix)


def check_npz(path: str, input_name: str, fix: str = "download it again") -> None:
    """An .npz must be a complete zip archive before numpy reads it."""
    problem = _problem(path)
    if problem is None and not zipfile.is_zipfile(path):
        problem = "is not an .npz archive (truncated, or another kind of file)"
    if problem:
        _refuse(input_name, path, problem, fix)
