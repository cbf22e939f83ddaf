// CPU kernels of roi_pool, forward and backward.
//
// Forward: one task per (image, block of 16 channels), copied into a cache-resident channel-interleaved buffer
// (roi_block.h), so each bin's max is a running max over each pixel's channel vectors (hand-written for AVX-512 in
// roi_pool_avx512.h); tasks run in parallel. The inference op _roi_pool_values is the same forward without writing
// the argmax. A float16/bfloat16 map is read in its dtype (with float32 RoIs, or RoIs of its dtype) and compared in
// float32: no float32 copy of the map.
// Backward: a scatter of each output gradient to its argmax, parallel over channels (each thread owns its planes:
// no races, deterministic), summed in float32 for float16/bfloat16 gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cfloat>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/common/checks.h"
#include "ops/common/roi_math.h"
#include "ops/cpu/large_output.h"
#include "ops/cpu/roi_block.h"
#include "runtime/cpu_features.h"

#if FRCNN_CPU_AVX512_KERNELS
#include <immintrin.h>
#define FRCNN_AVX512_FN FRCNN_CPU_TARGET_AVX512F
#include "ops/cpu/roi_pool_avx512.h"
#undef FRCNN_AVX512_FN
#endif

#if FRCNN_CPU_AVX512_TWIN
namespace fasterrcnn_ext {
// roi_pool_avx512.h's kernel compiled with SIMDe's portable intrinsics (roi_pool_avx512_twin.cpp).
void max_pool_bin_avx512_twin(const float* buf, int64_t width, int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                              float* best, int32_t* arg);
void max_pool_bin_avx512_twin(const double* buf, int64_t width, int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                              double* best, int64_t* arg);
}  // namespace fasterrcnn_ext
#endif

namespace fasterrcnn_ext {
namespace {

// The running max with argmax is written with roi_block.h's vector types (compilers do not vectorise it on their
// own): the block's channels are kBlock / L vectors of L lanes, each with its own running max.
template <typename acc_t>
using block_index_t = std::remove_reference_t<decltype(std::declval<typename VecTypes<acc_t>::Mask>()[0])>;

// Max over a bin's window of buf ([H][W][kBlock]) for the block's channels; the first occurrence wins ties (strict
// >, NaN never wins), as in torchvision; an empty bin gives 0 and -1. The argmax is the index into the (H, W) plane
// (< 2^31 pixels, checked).
// The even and odd columns of the bin run as two independent compare-and-select chains, merged at the end with ties
// going to the smaller index, which is the sequential scan's answer: one chain left the loop latency-bound (compare
// then blend, one pixel after another; 3-uop blends on Intel cores).
template <typename acc_t>
__attribute__((always_inline)) inline void max_pool_bin_impl(const acc_t* __restrict__ buf, int64_t width,
                                                             int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                                                             acc_t* __restrict__ best, block_index_t<acc_t>* arg) {
  using V = typename VecTypes<acc_t>::V;
  using I = typename VecTypes<acc_t>::Mask;
  using index_t = block_index_t<acc_t>;
  constexpr int kVectors = static_cast<int>(kBlock<acc_t> * sizeof(acc_t)) / kVecBytes;
  constexpr int kLanes = kVecBytes / sizeof(acc_t);
  const bool empty = h1 <= h0 || w1 <= w0;
  V even_best[kVectors], odd_best[kVectors];
  I even_arg[kVectors], odd_arg[kVectors];
  for (int j = 0; j < kVectors; ++j) {
    even_best[j] = odd_best[j] = V{} + (empty ? acc_t(0) : static_cast<acc_t>(-FLT_MAX));
    even_arg[j] = odd_arg[j] = I{} - 1;
  }
  auto update = [&](V* vbest, I* varg, int64_t flat) {
    const acc_t* pixel = buf + flat * kBlock<acc_t>;
    const I index = I{} + static_cast<index_t>(flat);
    for (int j = 0; j < kVectors; ++j) {
      V v;
      std::memcpy(&v, pixel + j * kLanes, sizeof(V));
      const I greater = v > vbest[j];
      vbest[j] = greater ? v : vbest[j];
      varg[j] = greater ? index : varg[j];
    }
  };
  for (int64_t h = h0; h < h1; ++h) {
    int64_t w = w0;
    for (; w + 1 < w1; w += 2) {
      update(even_best, even_arg, h * width + w);
      update(odd_best, odd_arg, h * width + w + 1);
    }
    if (w < w1) update(even_best, even_arg, h * width + w);
  }
  for (int j = 0; j < kVectors; ++j) {
    // The odd chain's max wins if greater, or equal at a smaller index (both chains are -1 only at -FLT_MAX).
    const I odd_wins = (odd_best[j] > even_best[j]) | ((odd_best[j] == even_best[j]) & (odd_arg[j] < even_arg[j]));
    const V b = odd_wins ? odd_best[j] : even_best[j];
    const I a = odd_wins ? odd_arg[j] : even_arg[j];
    std::memcpy(best + j * kLanes, &b, sizeof(V));
    std::memcpy(arg + j * kLanes, &a, sizeof(I));
  }
}
FRCNN_CPU_MULTIVERSION_ARCH void max_pool_bin(const float* buf, int64_t width, int64_t h0, int64_t h1, int64_t w0,
                                              int64_t w1, float* best, int32_t* arg) {
  max_pool_bin_impl(buf, width, h0, h1, w0, w1, best, arg);
}
FRCNN_CPU_MULTIVERSION_ARCH void max_pool_bin(const double* buf, int64_t width, int64_t h0, int64_t h1, int64_t w0,
                                              int64_t w1, double* best, int64_t* arg) {
  max_pool_bin_impl(buf, width, h0, h1, w0, w1, best, arg);
}

template <typename acc_t>
using MaxPoolBinFn = void (*)(const acc_t*, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t*,
                              block_index_t<acc_t>*);

// The AVX-512 version's CPU twin when it is switched on (tests and sanitizer runs on CPUs without AVX-512), else the
// AVX-512 version where it is built, the CPU has AVX512F and it is not turned off (runtime/cpu_features.h), else the
// portable one (itself cloned per ISA).
template <typename acc_t>
MaxPoolBinFn<acc_t> pick_max_pool_bin() {
#if FRCNN_CPU_AVX512_TWIN
  if (cpu_avx512_twin_enabled()) return static_cast<MaxPoolBinFn<acc_t>>(&max_pool_bin_avx512_twin);
#endif
#if FRCNN_CPU_AVX512_KERNELS
  if (cpu_avx512_kernels_enabled()) return &roi_pool_avx512::max_pool_bin_avx512<acc_t>;
#endif
  return static_cast<MaxPoolBinFn<acc_t>>(&max_pool_bin);
}

// The rounded RoI on the feature map (torchvision's RoIPool geometry); `valid` is false for NaN coordinates.
template <typename acc_t>
struct RoIPoolGeometry {
  int64_t start_h, start_w;
  acc_t bin_h, bin_w;
  bool valid;
};

template <typename acc_t>
RoIPoolGeometry<acc_t> roi_pool_geometry(const acc_t* roi, acc_t scale, int64_t pooled_h, int64_t pooled_w) {
  RoIPoolGeometry<acc_t> g;
  bool ok = true;
  g.start_w = roi_pool_round(roi[1] * scale, ok);
  g.start_h = roi_pool_round(roi[2] * scale, ok);
  const int64_t end_w = roi_pool_round(roi[3] * scale, ok);
  const int64_t end_h = roi_pool_round(roi[4] * scale, ok);
  const int64_t roi_w = std::max<int64_t>(end_w - g.start_w + 1, 1);  // malformed RoIs become 1x1
  const int64_t roi_h = std::max<int64_t>(end_h - g.start_h + 1, 1);
  g.bin_h = static_cast<acc_t>(roi_h) / static_cast<acc_t>(pooled_h);
  g.bin_w = static_cast<acc_t>(roi_w) / static_cast<acc_t>(pooled_w);
  g.valid = ok;
  return g;
}

// with_argmax = false (the inference op) leaves the argmax out: it is twice the output's bytes (int64), and writing it
// was a third of the forward's time.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu_typed(const at::Tensor& input, const at::Tensor& rois_in,
                                                              double spatial_scale, int64_t ph, int64_t pw,
                                                              bool with_argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  const int64_t k = rois_in.size(0);
  FRCNN_CHECK(height * width < (int64_t{1} << 31), "roi_pool: the input plane has ", height, " x ", width,
              " pixels; at most 2^31 - 1 are supported");
  at::Tensor output = empty_large({k, channels, ph, pw}, input.options());
  at::Tensor argmax = with_argmax ? empty_large({k, channels, ph, pw}, input.options().dtype(at::kLong)) : at::Tensor();
  if (k == 0 || channels == 0) return {output, argmax};
  const at::Tensor rois_t = rois_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* rois = rois_t.data_ptr<acc_t>();
  for (int64_t r = 0; r < k; ++r) check_roi_batch_index(rois[5 * r], r, batch, "roi_pool");
  scalar_t* out = output.data_ptr<scalar_t>();
  int64_t* arg_out = with_argmax ? argmax.data_ptr<int64_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(spatial_scale);
  constexpr int64_t B = kBlock<acc_t>;
  const int64_t blocks = (channels + B - 1) / B, bins = ph * pw;
  std::vector<int64_t> batch_of_roi(k);
  for (int64_t r = 0; r < k; ++r) batch_of_roi[r] = static_cast<int64_t>(rois[5 * r]);
  RoIsByImage by_image(batch_of_roi, batch);
  by_image.sort_each_image([&](int64_t a, int64_t b) { return top_edge_key(rois[5 * a + 2]) < top_edge_key(rois[5 * b + 2]); });

  const MaxPoolBinFn<acc_t> max_pool_bin_fn = pick_max_pool_bin<acc_t>();
  at::parallel_for(0, batch * blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(height * width * B);
    std::vector<acc_t> best(bins * B);
    std::vector<block_index_t<acc_t>> arg(bins * B);
    std::vector<scalar_t> staged(bins * B);
    std::vector<int64_t> staged_arg(bins * B);
    std::vector<int64_t> h0(ph), h1(ph), w0(pw), w1(pw);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * B, nc = std::min(B, channels - c0);
      int64_t rows_ready = 0;
      for (int64_t i = by_image.begin[n]; i < by_image.begin[n + 1]; ++i) {
        const int64_t r = by_image.ids[i];
        const RoIPoolGeometry<acc_t> g = roi_pool_geometry(rois + 5 * r, scale, ph, pw);
        int64_t rows_end = 0;
        for (int64_t p = 0; p < ph; ++p) {
          h0[p] = h1[p] = 0;
          if (g.valid) roi_pool_bin(p, g.bin_h, g.start_h, height, h0[p], h1[p]);
          rows_end = std::max(rows_end, h1[p]);
        }
        for (int64_t q = 0; q < pw; ++q) {
          w0[q] = w1[q] = 0;
          if (g.valid) roi_pool_bin(q, g.bin_w, g.start_w, width, w0[q], w1[q]);
        }
        // The rows are gathered as the RoIs (in top-edge order) first need them: rows no RoI reads never are.
        if (rows_end > rows_ready) {
          gather_channel_block<scalar_t, acc_t>(input, n, c0, rows_ready, rows_end, buf.data());
          rows_ready = rows_end;
        }
        for (int64_t p = 0; p < ph; ++p) {
          for (int64_t q = 0; q < pw; ++q) {
            max_pool_bin_fn(buf.data(), width, h0[p], h1[p], w0[q], w1[q], best.data() + (p * pw + q) * B,
                         arg.data() + (p * pw + q) * B);
          }
        }
        // Staged as the outputs' [channel][bin], then streamed out (see roi_align's forward).
        const int64_t o = (r * channels + c0) * bins;
        store_block_rows(best.data(), bins, nc, staged.data(), bins);
        stream_store(staged.data(), nc * bins * sizeof(scalar_t), out + o);
        if (with_argmax) {
          for (int64_t c = 0; c < nc; ++c) {
            for (int64_t b = 0; b < bins; ++b) staged_arg[c * bins + b] = arg[b * B + c];
          }
          stream_store(staged_arg.data(), nc * bins * sizeof(int64_t), arg_out + o);
        }
      }
    }
    stream_fence();
  });
  return {output, argmax};
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu_impl(const at::Tensor& input, const at::Tensor& rois,
                                                             double spatial_scale, int64_t pooled_height,
                                                             int64_t pooled_width, bool with_argmax) {
  check_roi_inputs(input, rois, spatial_scale, pooled_height, pooled_width, "roi_pool");
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cpu", [&] {
    out = roi_pool_forward_cpu_typed<scalar_t>(input, rois, spatial_scale, pooled_height, pooled_width, with_argmax);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                                        double spatial_scale, int64_t pooled_height,
                                                        int64_t pooled_width) {
  return roi_pool_forward_cpu_impl(input, rois, spatial_scale, pooled_height, pooled_width, /*with_argmax=*/true);
}

at::Tensor roi_pool_values_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                               int64_t pooled_height, int64_t pooled_width) {
  return std::get<0>(
      roi_pool_forward_cpu_impl(input, rois, spatial_scale, pooled_height, pooled_width, /*with_argmax=*/false));
}

at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                 double spatial_scale, int64_t pooled_height, int64_t pooled_width,
                                 int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  const int64_t k = rois.size(0);
  check_pool_grad(grad, k, channels, pooled_height, pooled_width, "roi_pool backward");
  check_same_shape(grad, "grad", argmax, "argmax", "roi_pool backward");
  // Summed in the accumulation type (float32 for float16/bfloat16 gradients), rounded to grad's dtype once.
  at::Tensor grad_input =
      at::zeros({batch_size, channels, height, width}, grad.options().dtype(at::toOpMathType(grad.scalar_type())));
  if (k == 0 || channels == 0) return grad_input.to(grad.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g_t = grad.contiguous();
    const at::Tensor a_t = argmax.to(at::kLong).contiguous();
    const at::Tensor rois_t = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* g = g_t.data_ptr<scalar_t>();
    const int64_t* a = a_t.data_ptr<int64_t>();
    const acc_t* roi = rois_t.data_ptr<acc_t>();
    acc_t* gin = grad_input.data_ptr<acc_t>();
    const int64_t plane = height * width, bins = pooled_height * pooled_width;
    for (int64_t r = 0; r < k; ++r) check_roi_batch_index(roi[5 * r], r, batch_size, "roi_pool backward");
    at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = 0; r < k; ++r) {
          acc_t* dst = gin + (static_cast<int64_t>(roi[5 * r]) * channels + c) * plane;
          const int64_t o = (r * channels + c) * bins;
          for (int64_t i = 0; i < bins; ++i) {
            const int64_t idx = a[o + i];
            // An empty bin has argmax -1 and no gradient; an index outside the plane is bad input, not a write.
            if (idx >= 0 && idx < plane) dst[idx] += static_cast<acc_t>(g[o + i]);
          }
        }
      }
    });
  });
  return grad_input.to(grad.scalar_type());
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("roi_pool", &fasterrcnn_ext::roi_pool_forward_cpu);
  m.impl("_roi_pool_values", &fasterrcnn_ext::roi_pool_values_cpu);
  m.impl("_roi_pool_backward", &fasterrcnn_ext::roi_pool_backward_cpu);
}
