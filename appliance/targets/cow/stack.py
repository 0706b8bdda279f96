"""The words of a cow table and the chain its layers must form.

`0 <len> cow <base> <base_offset> [<layer>...]`: offsets in 512-byte sectors, as in every dm
table. A layer is one path (made by `appliance layer create`) or the seed's three words
`<bitmap_dev> <data_dev> <offset>` (told apart by the third word being a number). The last
layer is the writable one.

The chain (checked before anything is written to any layer): every layer has the device's
size and the grain of the others; the bottom layer's parent is the base, every other layer's
parent the layer under it in the table (a layer not attached yet has no parent: it takes one);
a sealed layer was sealed by the layer above it. The base is identified by its size and, if
the user set one, the UUID in its extended attribute `user.appliance.uuid`
(`setfattr -n user.appliance.uuid -v UUID BASE`), so a layer put on another base is refused.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import dataclass

from ... import SECTOR_SIZE
from .. import DeviceArg, TargetError, parse_int
from .layer import LayerError, open_layer

BASE_XATTR = "user.appliance.uuid"
_BASE_NS = uuidlib.UUID("6f1c1a52-5d0e-4f4c-9b0c-1f4f3c2a7e01")


@dataclass(frozen=True)
class LayerWords:
    words: tuple  # (path,) or (bitmap_dev, data_dev, offset)
    data_offset: int | None = None  # bytes, the three-word form's

    @property
    def name(self):
        return self.words[0]

    @property
    def split(self):
        return len(self.words) == 3


def _is_number(word):
    try:
        int(word, 0)
        return True
    except ValueError:
        return False


def parse_layers(words) -> list[LayerWords]:
    out, i = [], 0
    while i < len(words):
        if i + 2 < len(words) and _is_number(words[i + 2]) and not _is_number(words[i]):
            offset = parse_int(words[i + 2], f"layer {words[i]}: data offset") * SECTOR_SIZE
            out.append(LayerWords(tuple(words[i:i + 3]), offset))
            i += 3
        else:
            if _is_number(words[i]):
                raise TargetError(f"layer word {words[i]!r} is a number: a layer is one path or "
                                  "<bitmap_dev> <data_dev> <offset>")
            out.append(LayerWords((words[i],)))
            i += 1
    return out


def layer_devices(layers):
    """DeviceArgs of the layers: a layer file (its size is checked against its header), or a
    bitmap device and a data device at its offset."""
    out = []
    for lw in layers:
        if lw.split:
            out += [DeviceArg(lw.words[0], 0), DeviceArg(lw.words[1], lw.data_offset)]
        else:
            out.append(DeviceArg(lw.words[0], 0))
    return out


def base_uuid(size, path=None):
    """The base's identity: its size, and the UUID the user set on it, if any."""
    user = ""
    if path is not None:
        try:
            user = os.getxattr(path, BASE_XATTR).decode().strip()
        except OSError:
            pass
    return uuidlib.uuid5(_BASE_NS, f"{size}:{user}")


def check_chain(layers, size, parent_of_bottom, base_name):
    """Raise TargetError naming the first layer that does not chain; return the stack's grain.
    `layers` are attached Layers, bottom first."""
    seen = {}
    for layer in layers:
        if layer.uuid in seen:
            raise TargetError(f"layer {layer.name}: the same layer ({layer.uuid}) as {seen[layer.uuid]}; "
                              "a layer is in a stack once")
        seen[layer.uuid] = layer.name
    grain = layers[0].grain if layers else None
    for layer in layers:  # geometry first: a layer of another size says so, whatever its place
        h = layer.header
        if h.size != size:
            raise TargetError(f"layer {layer.name}: {h.size} bytes, the device is {size} bytes")
        if h.grain != grain:
            raise TargetError(f"layer {layer.name}: grain {h.grain} bytes, the bottom layer's is {grain}")
    for i, layer in enumerate(layers):
        h = layer.header
        expected = parent_of_bottom if i == 0 else layers[i - 1].uuid
        under = f"the base {base_name}" if i == 0 else f"layer {layers[i - 1].name} ({expected})"
        if h.parent is not None and h.parent != expected:
            raise TargetError(f"layer {layer.name}: its parent is {h.parent}, not {under}: "
                              "the layers are in the wrong order, one is missing, or the base is another")
        if i + 1 < len(layers) and h.child is not None and h.child != layers[i + 1].uuid:
            raise TargetError(f"layer {layer.name}: layer {h.child} was pushed on it, not "
                              f"{layers[i + 1].name} ({layers[i + 1].uuid}): a layer is missing from the table")
    return grain


def check_offline(layers, size, base_path):
    """check-config's chain check: open each layer read-only (nothing written), check the chain."""
    opened = []
    try:
        for lw in layers:
            if lw.split and not _has_header(lw.words[0]):
                continue  # an unused bitmap device: it gets its header when first attached
            words = list(lw.words[:2]) + ([str(lw.data_offset)] if lw.split else [])
            try:
                opened.append(open_layer(words, writable=False))
            except LayerError as e:
                raise TargetError(str(e)) from None
        if opened and opened[-1] is not None and len(opened) == len(layers) and opened[-1].header.sealed:
            h = opened[-1].header
            pushed = f" (layer {h.child} was pushed on it)" if h.child else ""
            raise TargetError(f"{opened[-1].name}: sealed{pushed}; a sealed layer is never attached as the writable one")
        check_chain(opened, size, base_uuid(size, base_path), base_path)
    finally:
        for layer in opened:
            layer.close()


def _has_header(path):
    try:
        with open(path, "rb") as f:
            return any(f.read(4096))
    except OSError:
        return True  # open_layer says what is wrong with it
