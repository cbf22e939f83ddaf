// The constants of the detector's arithmetic, in one place for every kernel (their Python twins are in
// fasterrcnn_ext/ops/constants.py).
#pragma once

namespace fasterrcnn_ext {

// log(1000 / 16): decoding clamps dw and dh at this before exp(), so a box grows at most 1000/16 = 62.5 times its
// reference (the largest image side over the smallest stride) and exp() cannot overflow (torchvision's value).
// The kernels take the clamp as an argument (a model's box coder may set another); this is its default in the
// schemas, hence a string: the shortest decimal that reads back as the double log(1000 / 16).
#define FRCNN_BBOX_XFORM_CLIP "4.135166556742356"

// The FPN level rule (FPN paper, eq. 1): level = floor(k0 + log2(sqrt(area) / s0) + eps). A RoI of
// sqrt(area) = s0 = 224 (the ImageNet pre-training size) pools from level k0 = 4 (P4); eps keeps a RoI exactly at a
// level boundary on the upper level despite the rounding of log2.
constexpr double kCanonicalScale = 224.0;
constexpr double kCanonicalLevel = 4.0;
constexpr float kFpnLevelEps = 1e-6f;

}  // namespace fasterrcnn_ext
