"""Which backing file a qcow2 image may name, and where it is on the host
(the rules of :func:`resolve_backing`).  Opening it is the caller's: the
reader is handed an opener."""
from __future__ import annotations

import os
import re
import stat

from ..errors import (CorruptImageError, InvalidArgumentError, NoSuchFileError, Param,
                      UnsupportedFeatureError)


def has_protocol(name: str) -> bool:
    """qemu's path_has_protocol: a ':' before any '/' (so 'nbd://x',
    'json:{...}', but also 'a_b:c' and '1:x') makes the part before it a
    protocol name; qemu opens no such name as a file."""
    colon, slash = name.find(":"), name.find("/")
    return colon >= 0 and (slash < 0 or colon < slash)


def resolve_backing(image_path: str, name: str, allow_backing) -> str:
    """The host path of the backing file ``name`` of the image at image_path.

    * ``allow_backing`` false: refused (UnsupportedFeatureError naming the
      backing file).
    * a path (str or PathLike): that file, whatever the image names.
    * True: ``name`` must be relative, free of ``..``, not a qemu protocol
      or ``json:`` name (no ':' before the first '/', as qemu's
      path_has_protocol), not end with '/', name a regular file as the
      kernel resolves it, and resolve (symlinks followed, with
      os.path.realpath) to a regular file inside the folder that really
      holds the image.
    """
    if not allow_backing:
        raise UnsupportedFeatureError.naming(
            f"{image_path}: the image has a backing file ({name!r}); backing files are read only when asked "
            f"(pass ", Param("allow_backing", True), ", or ", Param("allow_backing", placeholder="the backing file's path"),
            ")")
    if allow_backing is not True:
        path = os.fspath(allow_backing)
        _check_regular(path, f"{image_path}: backing file {path!r}")
        return path
    if not name or "\0" in name:
        raise CorruptImageError(f"{image_path}: the backing file name {name!r} is empty or holds a NUL byte")
    if os.path.isabs(name):
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} is an absolute path; only a name relative to the image's "
            f"folder is followed (pass the backing path explicitly to use it)")
    if ".." in re.split(r"[/\\]", name):
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} leaves the image's folder ('..'); pass the backing path "
            f"explicitly to use it")
    if has_protocol(name):
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} names a protocol or json: description, not a file (a ':' "
            f"before any '/'; qemu reads the part before it as a protocol name)")
    if name.endswith("/"):
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} ends with '/': it names a directory, which qemu cannot open "
            f"as an image (ENOTDIR)")
    folder = os.path.dirname(os.path.realpath(image_path))
    # the name as the kernel resolves it (as qemu opens it): 'file/.' is not 'file'
    _check_regular(os.path.join(folder, name), f"{image_path}: backing file {name!r}")
    real = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([folder, real]) != folder or real == folder:
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} resolves to {real!r}, outside the image's folder {folder!r} "
            f"(a symlink escaping it); pass the backing path explicitly to use it")
    _check_regular(real, f"{image_path}: backing file {name!r}")
    return real


def _check_regular(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NoSuchFileError(what) from None
    except OSError as exc:
        raise InvalidArgumentError(f"{what}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFeatureError(f"{what} is not a regular file")
