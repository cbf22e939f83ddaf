"""The constants of the detector's arithmetic, in one place for the Python side (their C++ twins are in
csrc/ops/common/constants.h; tests/ops/test_box_ops.py and test_poolers.py check that both sides agree)."""

import math

# log(1000 / 16): decoding clamps dw and dh at this before exp(), so a box grows at most 1000/16 = 62.5 times its
# reference (the largest image side over the smallest stride) and exp() cannot overflow (torchvision's value).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# The FPN level rule (FPN paper, eq. 1): level = floor(k0 + log2(sqrt(area) / s0) + 1e-6). A RoI of
# sqrt(area) = s0 = 224 (the ImageNet pre-training size) pools from level k0 = 4 (P4).
CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
# The rule's 1e-6: keeps a RoI exactly at a level boundary on the upper level despite the rounding of log2
# (kFpnLevelEps; torchvision's LevelMapper eps).
FPN_LEVEL_EPS = 1e-6
