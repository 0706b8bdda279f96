"""`push PATH`: a snapshot. A new layer goes on top and takes the writes; the old writable layer
becomes read-only and is sealed, naming the new one as its child.

Everything slow (creating the file, reading its header and bitmap) happens before the device
is suspended; suspended, only the old layer's bitmap sync and two header writes remain, so the
clients see a pause of milliseconds and stay connected. The order on disk: the old layer is
sealed first, then the new one takes it as parent. A crash in between leaves a sealed layer
that names its child, which a restart with the old table refuses (layer.attach), and a new
layer without a parent, which takes it when it is first attached.

The live table changes, not the config: `appliance table NAME` prints the new table.
"""

from __future__ import annotations

import os
import time

from .. import TargetError
from . import offline
from .layer import LayerError


def push(target, path):
    if not os.path.isabs(path):
        raise TargetError(f"push: {path!r} is not an absolute path")
    top = target.layers[-1] if target.layers else None
    if top is None or not top.layer.writable:
        raise TargetError("push: the device has no writable layer (it is read-only)")
    if target.merge is not None and target.merge.running:
        raise TargetError("push: a merge is running; wait for it or cancel it")
    try:
        if not os.path.exists(path):
            offline.create(path, target.length, target.grain)
        slot = target.open_layer((path,), True, target.grain)
    except (LayerError, OSError) as e:
        raise TargetError(f"push: {e}") from None
    try:
        h, layer = slot.layer.header, slot.layer
        if h.size != target.length or h.grain != target.grain:
            raise TargetError(f"push: {path} is a layer of {h.size} bytes in {h.grain}-byte grains; "
                              f"this stack is {target.length} bytes in {target.grain}-byte grains")
        if h.parent is not None or h.sealed or not layer.empty():
            raise TargetError(f"push: {path} is not an unused layer (it has a parent, a seal or data); "
                              "push a new path or one fresh from `appliance layer create`")
    except BaseException:
        target.close_slot(slot)
        raise
    device = target.ctx.device
    was_suspended = device.suspended
    t0 = time.monotonic()
    device.suspend()
    try:
        top.layer.seal(child=layer.uuid)
        layer.set_parent(top.layer.uuid)
        target.layers.append(slot)  # owns nothing yet: the index keeps its numbers
        target.refresh_fast_map()
    except (LayerError, OSError) as e:
        target.close_slot(slot)
        raise TargetError(f"push: {e}") from None
    finally:
        if not was_suspended:
            device.resume()
    ms = (time.monotonic() - t0) * 1000
    return f"pushed {path} on {top.layer.name} ({ms:.1f} ms suspended); {len(target.layers)} layers"
