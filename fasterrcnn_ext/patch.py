"""Our implementations behind torchvision's names, for detection code that calls torchvision and that one does not
edit (training frameworks, evaluation tools, sliced inference, research code bases).

    import fasterrcnn_ext
    fasterrcnn_ext.patch_torchvision()         # from here on torchvision.ops.nms is fasterrcnn_ext.ops.nms, ...
    with fasterrcnn_ext.patch_torchvision():   # or for a block: torchvision is as it was after it (an exception too)
        ...
    fasterrcnn_ext.patched()                   # what is in place: {"torchvision.ops.nms": fasterrcnn_ext.ops.nms, ...}
    fasterrcnn_ext.unpatch_torchvision()       # torchvision as it was

What the patch replaces, and where:

- the functions nms, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, roi_align and roi_pool: in
  torchvision.ops and in every torchvision module that holds them under any name (the modules that define them, and
  those that imported them at load time: ``roi_align`` in torchvision.ops.poolers and the detection RoI heads), so
  that torchvision's own functions reach ours: its batched_nms calls our nms, complete_box_iou and distance_box_iou
  our box_iou, its MultiScaleRoIAlign our roi_align, its RPN and RoI heads (through ``box_ops``) all of them;
- the classes RoIAlign, RoIPool and MultiScaleRoIAlign: in torchvision.ops and the modules that define them;
- the Faster R-CNN builders (fasterrcnn_resnet50_fpn, _v2, fasterrcnn_mobilenet_v3_large_fpn, _320_fpn): in
  torchvision.models.detection, its faster_rcnn module and torchvision.models' registry (``get_model``), as
  functions that keep torchvision's name, signature and weights enum (``get_model_weights``) and build our model;
- FasterRCNN and the modules it composes: RegionProposalNetwork and RoIHeads (in their modules and in faster_rcnn, so
  that a subclass of torchvision's FasterRCNN, Mask R-CNN and Keypoint R-CNN build ours), AnchorGenerator (in
  anchor_utils and rpn). Their box coder is ours through them.

Everything else is torchvision's: the other names of torchvision.ops (box_area, generalized_box_iou, ...), the
names that torchvision's FasterRCNN, MaskRCNN and KeypointRCNN check their arguments' types against
(faster_rcnn.AnchorGenerator and MultiScaleRoIAlign), so that those still take torchvision's own modules, and
whatever was bound before the patch outside torchvision's modules: ``from torchvision.ops import nms`` in another
package keeps torchvision's (call through the module, or patch before that import), and a model built before the
patch keeps its modules (its RPN and RoI heads still call the ops through torchvision.ops.boxes, which is ours).

Our ops take torchvision's arguments (ours add some after them) and give its results; for what they do not compute
themselves (integer boxes, box_iou's other formats and batched boxes) they call torchvision's originals, saved on
import (fasterrcnn_ext._torchvision), never a name the patch replaces, so nothing recurses.

The patch is idempotent (a second call also covers torchvision modules imported since) and thread-safe (one lock;
it may be called while modules import). A block's exit undoes the patch only if the block made it.
"""

from __future__ import annotations

import functools
import sys
import threading
from types import ModuleType

__all__ = ["patch_torchvision", "unpatch_torchvision", "patched", "TorchvisionPatch"]

_FUNCTIONS = ("nms", "batched_nms", "box_iou", "clip_boxes_to_image", "remove_small_boxes", "roi_align", "roi_pool")
_BUILDERS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
             "fasterrcnn_mobilenet_v3_large_320_fpn")
_DETECTION = "torchvision.models.detection"
# Each class: where ours is (fasterrcnn_ext.ops or .models.detection), and the modules whose name for it is replaced.
_CLASSES = {
    "RoIAlign": ("ops", ("torchvision.ops", "torchvision.ops.roi_align")),
    "RoIPool": ("ops", ("torchvision.ops", "torchvision.ops.roi_pool")),
    "MultiScaleRoIAlign": ("ops", ("torchvision.ops", "torchvision.ops.poolers")),
    "AnchorGenerator": ("detection", (f"{_DETECTION}.anchor_utils", f"{_DETECTION}.rpn")),
    "RegionProposalNetwork": ("detection", (f"{_DETECTION}.rpn", f"{_DETECTION}.faster_rcnn")),
    "RoIHeads": ("detection", (f"{_DETECTION}.roi_heads", f"{_DETECTION}.faster_rcnn")),
    "FasterRCNN": ("detection", (_DETECTION, f"{_DETECTION}.faster_rcnn")),
}

_lock = threading.RLock()
# (container, key, original, replacement) for every name the patch set, in order; container: a module or a dict.
_applied: list[tuple[object, str, object, object]] = []
_plan: dict | None = None


class TorchvisionPatch:
    """What patch_torchvision() returns: used as a context manager, it undoes the patch on exit if this call made
    it (torchvision was not patched before), also when the block raises."""

    def __init__(self, made_it: bool):
        self.made_it = made_it

    def __enter__(self) -> TorchvisionPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.made_it:
            unpatch_torchvision()

    def __repr__(self) -> str:
        return f"TorchvisionPatch({len(patched())} names in place)"


def _builder(ours, original):
    """A builder with the name, signature (``__wrapped__``) and module of torchvision's ``original`` that builds our
    model: torchvision.models' registry and get_model_weights read those."""

    @functools.wraps(original)
    def builder(*args, **kwargs):
        return ours(*args, **kwargs)

    builder.__doc__ = (f"fasterrcnn_ext.models.detection.{ours.__name__}, put in torchvision's place by "
                       f"fasterrcnn_ext.patch_torchvision(); torchvision's arguments and weights.\n\n"
                       f"{original.__doc__ or ''}")
    return builder


def _make_plan() -> dict:
    """Our object for each of torchvision's, by the original's id: functions and builders wherever torchvision's
    modules hold them, classes in the modules of _CLASSES."""
    from . import _torchvision as tv
    from . import ops
    from .models import detection

    everywhere = {id(getattr(tv, name)): (getattr(tv, name), getattr(ops, name)) for name in _FUNCTIONS}
    builders = {name: _builder(getattr(detection, name), getattr(tv, name)) for name in _BUILDERS}
    everywhere.update({id(getattr(tv, name)): (getattr(tv, name), builders[name]) for name in _BUILDERS})
    classes: dict[str, dict[str, tuple[object, object]]] = {}
    for name, (package, modules) in _CLASSES.items():
        ours = getattr(ops if package == "ops" else detection, name)
        for module in modules:
            classes.setdefault(module, {})[name] = (getattr(tv, name), ours)
    originals = {id(ours): original for original, ours in everywhere.values()}
    for names in classes.values():
        originals.update({id(ours): original for original, ours in names.values()})
    return {"everywhere": everywhere, "classes": classes, "builders": builders, "originals": originals}


def _torchvision_modules() -> list[tuple[str, ModuleType]]:
    return [(name, module) for name, module in list(sys.modules.items())
            if (name == "torchvision" or name.startswith("torchvision.")) and isinstance(module, ModuleType)]


def _set(container, key: str, original, replacement) -> None:
    if isinstance(container, dict):
        container[key] = replacement
    else:
        setattr(container, key, replacement)
    _applied.append((container, key, original, replacement))


def _get(container, key: str):
    return container.get(key) if isinstance(container, dict) else getattr(container, key, None)


def patch_torchvision() -> TorchvisionPatch:
    """Puts fasterrcnn_ext's ops, modules and Faster R-CNN builders behind torchvision's names (see the module's
    documentation for which, and where). Returns a TorchvisionPatch: ``with patch_torchvision(): ...`` undoes it
    at the block's exit."""
    from . import _library
    from . import _torchvision as tv
    from .models import detection  # noqa: F401  (imports torchvision.models.detection and ours, outside the lock)

    if not _library.LOADED:
        _library.assert_loaded()  # raises: torchvision's callers would get our ops, which cannot run
    import torchvision.models._api as registry_module

    with _lock:
        global _plan
        made_it = not _applied
        if _plan is None:
            _plan = _make_plan()
        everywhere, classes = _plan["everywhere"], _plan["classes"]
        for module_name, module in _torchvision_modules():
            for key, value in list(vars(module).items()):
                target = everywhere.get(id(value))
                if target is not None and target[0] is value:
                    _set(module, key, value, target[1])
            for key, (original, ours) in classes.get(module_name, {}).items():
                if getattr(module, key, None) is original:
                    _set(module, key, original, ours)
        registry = registry_module.BUILTIN_MODELS
        for name, builder in _plan["builders"].items():
            original = getattr(tv, name)
            if registry.get(name) is original:
                _set(registry, name, original, builder)
        return TorchvisionPatch(made_it and bool(_applied))


def unpatch_torchvision() -> None:
    """Puts torchvision's own objects back wherever the patch put ours (also in torchvision modules imported while
    patched, which took ours from torchvision.ops). A name that someone else has set since is left as it is."""
    with _lock:
        while _applied:
            container, key, original, replacement = _applied.pop()
            if _get(container, key) is replacement:
                if isinstance(container, dict):
                    container[key] = original
                else:
                    setattr(container, key, original)
        if _plan is None:
            return
        originals = _plan["originals"]
        for _, module in _torchvision_modules():
            for key, value in list(vars(module).items()):
                original = originals.get(id(value))
                if original is not None:
                    setattr(module, key, original)


def patched() -> dict[str, object]:
    """What the patch has put in place and is still there: {"torchvision.ops.nms": fasterrcnn_ext.ops.nms,
    "torchvision.ops.boxes.nms": ..., "torchvision.models._api.BUILTIN_MODELS['fasterrcnn_resnet50_fpn']": ...};
    empty when torchvision is not patched."""
    with _lock:
        result = {}
        for container, key, _, replacement in _applied:
            if _get(container, key) is replacement:
                where = (f"torchvision.models._api.BUILTIN_MODELS[{key!r}]" if isinstance(container, dict)
                         else f"{container.__name__}.{key}")
                result[where] = replacement
        return result
