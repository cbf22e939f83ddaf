// QuantizedCPU kernel of roi_align: torchvision's quantized RoIAlign, for quint8, qint8 and qint32 maps (per-tensor
// affine) with RoIs quantized to the map's dtype. As torchvision's:
//   - one image (N = 1): not every batch index is representable in a quantized dtype (1, 3, 5... are not when the
//     scale is 2), so a quantized batch holds one image; here each RoI's batch index must dequantize to 0;
//   - the RoI coordinates are dequantized to float32 and pooled with the float kernels' geometry in float32
//     (common/roi_math.h, whose arithmetic is torchvision's);
//   - a bin sums its samples' bilinear taps over the raw integer values, with the sum of their weights, then
//     dequantizes (scale * (sum - zero_point * weights)), averages and requantizes with the input's scale and zero
//     point (round half to even, clamped to the dtype's range).
// Differs only where the float kernels do: the adaptive sampling grid is capped (roi_align_max_grid) for RoIs whose
// bins exceed twice the feature map.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/common/checks.h"
#include "ops/common/roi_math.h"

namespace fasterrcnn_ext {
namespace {

// `t` is a per-tensor affine quantized tensor of quint8, qint8 or qint32.
void check_quantized(const at::Tensor& t, const char* name, const char* op) {
  const c10::ScalarType dtype = t.scalar_type();
  FRCNN_CHECK(dtype == at::kQUInt8 || dtype == at::kQInt8 || dtype == at::kQInt32, op, ": quantized ", name,
              " must be quint8, qint8 or qint32, got ", dtype);
  FRCNN_CHECK(t.qscheme() == at::kPerTensorAffine, op, ": quantized ", name,
              " must be quantized per tensor (affine), got another quantization scheme");
}

template <typename q_t>
void qroi_align_typed(const at::Tensor& input, const at::Tensor& rois, float spatial_scale, int64_t pooled_h,
                      int64_t pooled_w, int64_t sampling_ratio, bool aligned, at::Tensor& output) {
  using raw_t = typename q_t::underlying;
  const at::Tensor in_t = input.contiguous(), rois_t = rois.contiguous();
  const raw_t* in = reinterpret_cast<const raw_t*>(in_t.data_ptr<q_t>());
  const raw_t* roi_raw = reinterpret_cast<const raw_t*>(rois_t.data_ptr<q_t>());
  raw_t* out = reinterpret_cast<raw_t*>(output.data_ptr<q_t>());
  const int64_t k = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  const int64_t bins = pooled_h * pooled_w;
  const float in_scale = static_cast<float>(input.q_scale()), roi_scale = static_cast<float>(rois.q_scale());
  const int64_t in_zp = input.q_zero_point(), roi_zp = rois.q_zero_point();
  // As ATen's dequantize_val and quantize_val, which torchvision's kernel used.
  const auto dequantize = [&](raw_t v) { return roi_scale * static_cast<float>(static_cast<int64_t>(v) - roi_zp); };
  const float inv_scale = 1.0f / in_scale;
  constexpr int64_t qmin = std::numeric_limits<raw_t>::min(), qmax = std::numeric_limits<raw_t>::max();
  for (int64_t r = 0; r < k; ++r) {
    const float b = dequantize(roi_raw[5 * r]);
    FRCNN_CHECK(b == 0.0f, "roi_align: rois[", r, ", 0] = ", b,
                " is not a valid batch index: a quantized input holds one image, index 0");
  }
  at::parallel_for(0, k, 1, [&](int64_t lo, int64_t hi) {
    std::vector<AxisWeights<float>> ys, xs;
    std::vector<int64_t> y_begin(pooled_h + 1), x_begin(pooled_w + 1);
    for (int64_t r = lo; r < hi; ++r) {
      const raw_t* roi = roi_raw + 5 * r;
      const RoIAlignGeometry<float> g =
          roi_align_geometry(dequantize(roi[1]), dequantize(roi[2]), dequantize(roi[3]), dequantize(roi[4]),
                             spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, height, width);
      // Each bin's valid samples per axis, in sample order (a sample outside the map adds nothing, as its zero
      // weights add nothing to torchvision's sums).
      ys.resize(pooled_h * g.grid_h);
      xs.resize(pooled_w * g.grid_w);
      y_begin[0] = x_begin[0] = 0;
      for (int64_t p = 0; p < pooled_h; ++p) {
        y_begin[p + 1] =
            y_begin[p] + roi_align_bin_samples(g.start_h, p, g.bin_h, g.grid_h, height, ys.data() + y_begin[p]);
      }
      for (int64_t q = 0; q < pooled_w; ++q) {
        x_begin[q + 1] =
            x_begin[q] + roi_align_bin_samples(g.start_w, q, g.bin_w, g.grid_w, width, xs.data() + x_begin[q]);
      }
      for (int64_t c = 0; c < channels; ++c) {
        const raw_t* plane = in + c * height * width;
        raw_t* o = out + (r * channels + c) * bins;
        for (int64_t p = 0; p < pooled_h; ++p) {
          for (int64_t q = 0; q < pooled_w; ++q) {
            float sum = 0.0f, sum_w = 0.0f;
            for (int64_t yi = y_begin[p]; yi < y_begin[p + 1]; ++yi) {
              const AxisWeights<float>& y = ys[yi];
              const raw_t* row_low = plane + y.low * width;
              const raw_t* row_high = plane + y.high * width;
              for (int64_t xi = x_begin[q]; xi < x_begin[q + 1]; ++xi) {
                const AxisWeights<float>& x = xs[xi];
                const float w1 = y.w_low * x.w_low, w2 = y.w_low * x.w_high, w3 = y.w_high * x.w_low,
                            w4 = y.w_high * x.w_high;
                sum += w1 * static_cast<float>(row_low[x.low]) + w2 * static_cast<float>(row_low[x.high]) +
                       w3 * static_cast<float>(row_high[x.low]) + w4 * static_cast<float>(row_high[x.high]);
                sum_w += w1 + w2 + w3 + w4;
              }
            }
            float v = in_scale * (sum - static_cast<float>(in_zp) * sum_w);
            v /= g.count;
            const int64_t qv = static_cast<int64_t>(static_cast<float>(in_zp) + std::nearbyint(v * inv_scale));
            o[p * pooled_w + q] = static_cast<raw_t>(std::min(std::max(qv, qmin), qmax));
          }
        }
      }
    }
  });
}

at::Tensor roi_align_quantized_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                   bool aligned) {
  const char* op = "roi_align";
  FRCNN_CHECK(input.is_quantized(), op, ": quantized rois need a quantized input of their dtype, got input dtype ",
              input.scalar_type());
  check_quantized(input, "input", op);
  FRCNN_CHECK(input.dim() == 4, op, ": input must be a [N, C, H, W] tensor, got shape ", input.sizes());
  FRCNN_CHECK(input.size(0) == 1, op, ": a quantized input must hold one image (N = 1, as torchvision), got N = ",
              input.size(0));
  FRCNN_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must be a [K, 5] tensor of (batch index, x1, y1, x2, y2), got shape ", rois.sizes());
  FRCNN_CHECK(rois.is_quantized() && rois.scalar_type() == input.scalar_type(), op,
              ": rois of a quantized input must be quantized to its dtype (", input.scalar_type(), "), got ",
              rois.scalar_type());
  check_quantized(rois, "rois", op);
  check_same_device(input, "input", rois, "rois", op);
  FRCNN_CHECK(pooled_height > 0 && pooled_width > 0, op, ": output_size must be positive, got (", pooled_height,
              ", ", pooled_width, ")");
  FRCNN_CHECK(spatial_scale > 0, op, ": spatial_scale must be positive, got ", spatial_scale);
  at::Tensor output = at::_empty_affine_quantized({rois.size(0), input.size(1), pooled_height, pooled_width},
                                                  input.options(), input.q_scale(), input.q_zero_point());
  if (output.numel() == 0) return output;
  AT_DISPATCH_QINT_TYPES(input.scalar_type(), "roi_align_quantized_cpu", [&] {
    qroi_align_typed<scalar_t>(input, rois, static_cast<float>(spatial_scale), pooled_height, pooled_width,
                               sampling_ratio, aligned, output);
  });
  return output;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, QuantizedCPU, m) {
  m.impl("roi_align", &fasterrcnn_ext::roi_align_quantized_cpu);
}
