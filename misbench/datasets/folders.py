"""What an image folder holds: its class folders and their images, found without following a directory link
twice (DESIGN §3 DATA).

Class folders are the root's sub-folders, sorted (torchvision ImageFolder's convention), and their images
are listed in torchvision's order. Directory links inside a class folder are followed once each, and only to
folders that cannot give an image another class's label: a link to the root or above it, into another class
folder, or to a folder already listed is skipped with a warning (`ln -s .. class_00/loop` would otherwise list
every class's images again, labelled class 0, without end). A root with images and no class folders is an
unlabelled set: every label is UNLABELLED (MIS needs none; accuracy and class reports refuse it).
"""

__all__ = ["scan_folder", "UNLABELLED", "IMAGE_EXTENSIONS"]

import logging
import os

log = logging.getLogger(__name__)

UNLABELLED = -1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_dir(entry, root: str) -> bool | None:
    """Whether a folder entry is a directory (links followed); None for a link that resolves to nothing readable
    (a link to itself, a loop of links: ELOOP), left out with a warning instead of failing the whole listing."""
    try:
        return entry.is_dir()
    except OSError as err:
        log.warning("%s: %s cannot be followed (%s): left out", root, os.path.relpath(entry.path, root),
                    err.strerror or err)
        return None


def scan_folder(root) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folder names, [(path relative to root, folder index or UNLABELLED)]) in torchvision's order."""
    root = os.fspath(root)
    root_real = os.path.realpath(root)
    kinds = {e.name: (e, _is_dir(e, root)) for e in sorted(os.scandir(root), key=lambda e: e.name)}
    folders = [name for name, (_, is_dir) in kinds.items() if is_dir]
    if not folders:
        return [], [(name, UNLABELLED) for name, (e, is_dir) in kinds.items()
                    if is_dir is False and _is_image(name) and e.is_file()]
    reals = [os.path.realpath(os.path.join(root, name)) for name in folders]
    samples, visited = [], set()
    for k, (name, real) in enumerate(zip(folders, reals)):
        if _inside(root_real, real) or real in visited:
            log.warning("%s: class folder %s links to %s, the data's root (or above it) or another class folder: "
                        "left out", root, name, real)
            continue
        listed = []
        stack = [os.path.join(root, name)]
        while stack:
            directory = stack.pop()
            real_dir = os.path.realpath(directory)
            if real_dir in visited:
                log.warning("%s: %s leads to a folder already listed (a link loop or a second link): left out",
                            root, os.path.relpath(directory, root))
                continue
            if _inside(root_real, real_dir) or (_inside(real_dir, root_real) and not _inside(real_dir, real)):
                log.warning("%s: %s links to %s, outside class folder %s (the root, above it, or another class): "
                            "left out, so that no image is labelled by a class it does not belong to",
                            root, os.path.relpath(directory, root), real_dir, name)
                continue
            visited.add(real_dir)
            files, subdirs = [], []
            for entry in os.scandir(directory):
                is_dir = _is_dir(entry, root)
                if is_dir is not None:
                    (subdirs if is_dir else files).append(entry.name)
            listed.append((directory, sorted(f for f in files if _is_image(f))))
            stack.extend(os.path.join(directory, d) for d in sorted(subdirs, reverse=True))
        for directory, files in sorted(listed):  # torchvision: sorted(os.walk(...)), then each folder's files sorted
            samples.extend((os.path.relpath(os.path.join(directory, f), root), k) for f in files)
    return folders, samples
