// Fused CPU kernels of rpn_proposals and detection_postprocess.
//
// torchvision decodes every anchor (257,796 at 800 pixels) and runs the selection as a chain of tensor ops and a
// Python loop over images. Here: the top-k per level is a radix select over the logits; only the selected anchors
// are decoded; clipping, the size and score tests and the per-level (per-class) NMS run in one pass per image, with
// the images (and, for the top-k, the levels) in parallel. Box math: box_math.h, in acc_t.
// NaN logits or deltas: such candidates are dropped (NaN scores fail the score test, NaN boxes the size test), so
// every output is finite.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/common/box_math.h"
#include "ops/common/checks.h"
#include "ops/cpu/nms_cpu.h"

namespace fasterrcnn_ext {
namespace {

// An unsigned integer whose order is the value order (uint32 for float, uint64 for double), with -0 equal to +0 and
// NaN equal to -inf (NaN ranks below every number and ties with -inf, as in the selection's contract below).
template <typename acc_t>
using order_bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;

template <typename acc_t>
order_bits_t<acc_t> value_order_bits(acc_t x) {
  using bits_t = order_bits_t<acc_t>;
  constexpr bits_t kSign = bits_t{1} << (8 * sizeof(bits_t) - 1);
  if (std::isnan(x)) x = -std::numeric_limits<acc_t>::infinity();
  x = x + acc_t(0);  // -0 becomes +0
  bits_t b;
  std::memcpy(&b, &x, sizeof b);
  // Negatives: all bits flipped (magnitude order reversed); non-negatives: the sign bit set (above them). Branch-free:
  // logits' signs are random, and a branch on them mispredicted half the time.
  const bits_t flip = (bits_t{0} - (b >> (8 * sizeof(bits_t) - 1))) | kSign;
  return b ^ flip;
}

// Indices (relative to `values`) of the k largest values; NaN ranks below every number (tied with -inf); ties at the
// k-th value go to the lower index. Order: increasing index.
// A radix select: one pass histograms the top 11 bits of each value's order bits, which places the k-th value in
// one bucket; the buckets above are taken whole, and only the k-th's bucket is ordered (nth_element). On the RPN's
// logits (k = 1000 of 32,768) this is 2 passes over the values where nth_element was ~3n data-dependent branches.
template <typename acc_t>
std::vector<int64_t> top_k_indices(const acc_t* values, int64_t n, int64_t k) {
  using bits_t = order_bits_t<acc_t>;
  std::vector<int64_t> out;
  if (k <= 0 || n <= 0) return out;
  if (k >= n) {
    out.resize(n);
    std::iota(out.begin(), out.end(), int64_t{0});
    return out;
  }
  constexpr int kBucketBits = 11;
  constexpr int kShift = 8 * sizeof(bits_t) - kBucketBits;
  std::vector<bits_t> bits(n);
  std::vector<int64_t> count(int64_t{1} << kBucketBits, 0);
  for (int64_t i = 0; i < n; ++i) {
    bits[i] = value_order_bits(values[i]);
    ++count[bits[i] >> kShift];
  }
  int64_t bucket = (int64_t{1} << kBucketBits) - 1, above = 0;  // above: values in buckets above `bucket`
  while (above + count[bucket] < k) above += count[bucket--];
  out.reserve(k);
  std::vector<std::pair<bits_t, int64_t>> boundary;  // the k-th value's bucket
  boundary.reserve(count[bucket]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = static_cast<int64_t>(bits[i] >> kShift);
    if (b > bucket) {
      out.push_back(i);
    } else if (b == bucket) {
      boundary.emplace_back(bits[i], i);
    }
  }
  const int64_t need = k - above;  // 1 <= need <= boundary.size()
  if (static_cast<int64_t>(boundary.size()) > need) {
    // Larger value first; equal values: lower index first.
    const auto before = [](const auto& x, const auto& y) {
      return x.first != y.first ? x.first > y.first : x.second < y.second;
    };
    std::nth_element(boundary.begin(), boundary.begin() + (need - 1), boundary.end(), before);
  }
  for (int64_t j = 0; j < need; ++j) out.push_back(boundary[j].second);
  std::sort(out.begin(), out.end());
  return out;
}

// The box coder's weights (checked to be 4 by the caller) in acc_t.
template <typename acc_t>
BoxWeights<acc_t> box_weights(at::ArrayRef<double> weights) {
  return {static_cast<acc_t>(weights[0]), static_cast<acc_t>(weights[1]), static_cast<acc_t>(weights[2]),
          static_cast<acc_t>(weights[3])};
}

template <typename acc_t>
acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// Decodes one candidate box, clips it to the image and applies the minimum-size test (NaN boxes fail it).
template <typename acc_t, typename scalar_t>
bool decode_clip_keep(const scalar_t* delta, const scalar_t* reference, const BoxWeights<acc_t>& w, acc_t clip,
                      acc_t height, acc_t width, acc_t min_side, acc_t* box) {
  decode_box<acc_t>(delta[0], delta[1], delta[2], delta[3], reference[0], reference[1], reference[2], reference[3], w,
                    clip, box);
  box[0] = clip_coordinate(box[0], width);
  box[1] = clip_coordinate(box[1], height);
  box[2] = clip_coordinate(box[2], width);
  box[3] = clip_coordinate(box[3], height);
  return box_is_large_enough(box[0], box[1], box[2], box[3], min_side);
}

// Kept boxes of one image, in output order.
template <typename acc_t>
struct ImageResult {
  std::vector<acc_t> boxes, scores;
  std::vector<int64_t> labels;
};

// Candidates of one image before NMS.
template <typename acc_t>
struct Candidates {
  std::vector<acc_t> boxes, scores;
  std::vector<int64_t> classes;
  void add(const acc_t* box, acc_t score, int64_t cls) {
    boxes.insert(boxes.end(), box, box + 4);
    scores.push_back(score);
    classes.push_back(cls);
  }
  int64_t size() const { return static_cast<int64_t>(scores.size()); }
};

// NMS per class of one image's candidates; the kept boxes, scores and classes in score order.
template <typename acc_t>
ImageResult<acc_t> suppress(const Candidates<acc_t>& c, double nms_thresh, int64_t max_keep) {
  ImageResult<acc_t> r;
  const std::vector<int64_t> keep =
      nms_keep<acc_t>(c.boxes.data(), c.scores.data(), c.classes.data(), c.size(), nms_thresh, max_keep);
  for (int64_t i : keep) {
    r.boxes.insert(r.boxes.end(), c.boxes.begin() + 4 * i, c.boxes.begin() + 4 * i + 4);
    r.scores.push_back(c.scores[i]);
    r.labels.push_back(c.classes[i]);
  }
  return r;
}

// Concatenates per-image results into (boxes [K, 4], scores [K], labels [K], counts [N]) of `dtype`.
template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> concat_results(const std::vector<ImageResult<acc_t>>& results, const at::TensorOptions& opts) {
  int64_t total = 0;
  for (const auto& r : results) total += static_cast<int64_t>(r.scores.size());
  at::Tensor boxes = at::empty({total, 4}, opts), scores = at::empty({total}, opts);
  at::Tensor labels = at::empty({total}, opts.dtype(at::kLong));
  at::Tensor counts = at::empty({static_cast<int64_t>(results.size())}, opts.dtype(at::kLong));
  scalar_t* b = boxes.data_ptr<scalar_t>();
  scalar_t* s = scores.data_ptr<scalar_t>();
  int64_t* l = labels.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t o = 0;
  for (size_t n = 0; n < results.size(); ++n) {
    const auto& r = results[n];
    const int64_t m = static_cast<int64_t>(r.scores.size());
    for (int64_t i = 0; i < 4 * m; ++i) b[4 * o + i] = static_cast<scalar_t>(r.boxes[i]);
    for (int64_t i = 0; i < m; ++i) {
      s[o + i] = static_cast<scalar_t>(r.scores[i]);
      l[o + i] = r.labels[i];
    }
    cnt[n] = m;
    o += m;
  }
  return {boxes, scores, labels, counts};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rpn_proposals_cpu_typed(
    const at::Tensor& objectness_in, const at::Tensor& deltas_in, const at::Tensor& anchors_in,
    at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes, int64_t pre_nms_top_n, int64_t post_nms_top_n,
    double nms_thresh, double score_thresh, double min_size, at::ArrayRef<double> weights, double bbox_xform_clip) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor objectness = objectness_in.to(acc_type).contiguous();
  const at::Tensor deltas = deltas_in.contiguous(), anchors = anchors_in.contiguous();
  const int64_t batch = objectness.size(0), total = objectness.size(1);
  const int64_t levels = static_cast<int64_t>(num_anchors_per_level.size());
  std::vector<int64_t> level_begin{0};
  for (int64_t n : num_anchors_per_level) level_begin.push_back(level_begin.back() + n);
  const acc_t* logits = objectness.data_ptr<acc_t>();
  const scalar_t* d = deltas.data_ptr<scalar_t>();
  const scalar_t* a = anchors.data_ptr<scalar_t>();

  // The top pre_nms_top_n anchors of each (image, level). Large levels (P2 has 3/4 of the anchors) are split into
  // chunks whose top-k run in parallel; a level's top-k is then the top-k of its chunks' (in index order, so ties
  // still go to the lower index).
  constexpr int64_t kChunk = 32768;
  struct Task {
    int64_t image_level, begin, count;
  };
  std::vector<Task> tasks;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t l = 0; l < levels; ++l) {
      for (int64_t b = level_begin[l]; b < level_begin[l + 1]; b += kChunk) {
        tasks.push_back({n * levels + l, b, std::min(kChunk, level_begin[l + 1] - b)});
      }
    }
  }
  std::vector<std::vector<int64_t>> chunk_top(tasks.size());
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const Task& task = tasks[t];
      const int64_t n = task.image_level / levels;
      chunk_top[t] = top_k_indices(logits + n * total + task.begin, task.count, std::min(pre_nms_top_n, task.count));
      for (int64_t& i : chunk_top[t]) i += task.begin;
    }
  });
  std::vector<std::vector<int64_t>> top(batch * levels);
  for (size_t t = 0; t < tasks.size(); ++t) {
    std::vector<int64_t>& dst = top[tasks[t].image_level];
    dst.insert(dst.end(), chunk_top[t].begin(), chunk_top[t].end());
  }
  at::parallel_for(0, batch * levels, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> values;
    for (int64_t t = lo; t < hi; ++t) {
      std::vector<int64_t>& candidates = top[t];
      const int64_t k = std::min(pre_nms_top_n, num_anchors_per_level[t % levels]);
      if (static_cast<int64_t>(candidates.size()) <= k) continue;
      const acc_t* row = logits + (t / levels) * total;
      values.resize(candidates.size());
      for (size_t i = 0; i < candidates.size(); ++i) values[i] = row[candidates[i]];
      std::vector<int64_t> keep = top_k_indices(values.data(), static_cast<int64_t>(values.size()), k);
      for (int64_t& i : keep) i = candidates[i];
      candidates = std::move(keep);
    }
  });

  const BoxWeights<acc_t> w = box_weights<acc_t>(weights);
  const acc_t clip = static_cast<acc_t>(bbox_xform_clip);
  const acc_t min_side = static_cast<acc_t>(min_size), min_score = static_cast<acc_t>(score_thresh);
  std::vector<ImageResult<acc_t>> results(batch);
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const acc_t height = static_cast<acc_t>(image_sizes[2 * n]), width = static_cast<acc_t>(image_sizes[2 * n + 1]);
      Candidates<acc_t> c;
      for (int64_t l = 0; l < levels; ++l) {
        for (int64_t i : top[n * levels + l]) {
          const acc_t score = sigmoid(logits[n * total + i]);
          if (!(score >= min_score)) continue;  // ">=" as torchvision; NaN fails
          acc_t box[4];
          if (!decode_clip_keep(d + (n * total + i) * 4, a + i * 4, w, clip, height, width, min_side, box)) continue;
          c.add(box, score, l);
        }
      }
      results[n] = suppress(c, nms_thresh, post_nms_top_n);
    }
  });
  std::vector<at::Tensor> out = concat_results<scalar_t>(results, objectness_in.options());
  return {out[0], out[1], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rpn_proposals_cpu(
    const at::Tensor& objectness, const at::Tensor& deltas, const at::Tensor& anchors,
    at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes, int64_t pre_nms_top_n, int64_t post_nms_top_n,
    double nms_thresh, double score_thresh, double min_size, at::ArrayRef<double> weights, double bbox_xform_clip) {
  check_rpn_inputs(objectness, deltas, anchors, num_anchors_per_level, image_sizes, weights);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, objectness.scalar_type(), "rpn_proposals_cpu", [&] {
    out = rpn_proposals_cpu_typed<scalar_t>(objectness, deltas, anchors, num_anchors_per_level, image_sizes,
                                            pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size,
                                            weights, bbox_xform_clip);
  });
  return out;
}

template <typename scalar_t>
std::vector<at::Tensor> detection_postprocess_cpu_typed(const at::Tensor& class_logits_in,
                                                        const at::Tensor& box_regression_in,
                                                        const at::Tensor& proposals_in,
                                                        const std::vector<int64_t>& image_begin,
                                                        const std::vector<int64_t>& image_end,
                                                        at::IntArrayRef image_sizes, at::ArrayRef<double> weights,
                                                        double score_thresh, double nms_thresh,
                                                        int64_t detections_per_img, double min_size,
                                                        double bbox_xform_clip) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor class_logits = class_logits_in.contiguous(), box_regression = box_regression_in.contiguous();
  const at::Tensor proposals = proposals_in.contiguous();
  const int64_t classes = class_logits.size(1), batch = static_cast<int64_t>(image_begin.size());
  const scalar_t* logits = class_logits.data_ptr<scalar_t>();
  const scalar_t* reg = box_regression.data_ptr<scalar_t>();
  const scalar_t* props = proposals.data_ptr<scalar_t>();
  const BoxWeights<acc_t> w = box_weights<acc_t>(weights);
  const acc_t clip = static_cast<acc_t>(bbox_xform_clip);
  const acc_t min_side = static_cast<acc_t>(min_size), min_score = static_cast<acc_t>(score_thresh);

  std::vector<ImageResult<acc_t>> results(batch);
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> prob(classes);
    for (int64_t n = lo; n < hi; ++n) {
      const acc_t height = static_cast<acc_t>(image_sizes[2 * n]), width = static_cast<acc_t>(image_sizes[2 * n + 1]);
      Candidates<acc_t> c;
      for (int64_t i = image_begin[n]; i < image_end[n]; ++i) {
        // Softmax over the classes, max-subtracted as torch.softmax.
        const scalar_t* row = logits + i * classes;
        acc_t max_logit = static_cast<acc_t>(row[0]);
        for (int64_t k = 1; k < classes; ++k) max_logit = std::max(max_logit, static_cast<acc_t>(row[k]));
        acc_t sum = 0;
        for (int64_t k = 0; k < classes; ++k) sum += (prob[k] = std::exp(static_cast<acc_t>(row[k]) - max_logit));
        const scalar_t* p = props + 4 * i;
        for (int64_t k = 1; k < classes; ++k) {  // class 0 is the background
          const acc_t score = prob[k] / sum;
          if (!(score > min_score)) continue;  // ">" as torchvision; NaN fails
          acc_t box[4];
          if (!decode_clip_keep(reg + (i * classes + k) * 4, p, w, clip, height, width, min_side, box)) continue;
          c.add(box, score, k);
        }
      }
      results[n] = suppress(c, nms_thresh, detections_per_img);
    }
  });
  return concat_results<scalar_t>(results, class_logits_in.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> detection_postprocess_cpu(
    const at::Tensor& class_logits, const at::Tensor& box_regression, const at::Tensor& proposals,
    at::IntArrayRef boxes_per_image, at::IntArrayRef image_sizes, at::ArrayRef<double> weights, double score_thresh,
    double nms_thresh, int64_t detections_per_img, double min_size, double bbox_xform_clip) {
  check_detection_inputs(class_logits, box_regression, proposals, boxes_per_image, image_sizes, weights);
  std::vector<int64_t> image_begin, image_end;
  int64_t row = 0;
  for (int64_t n : boxes_per_image) {
    image_begin.push_back(row);
    image_end.push_back(row += n);
  }
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, class_logits.scalar_type(), "detection_postprocess_cpu",
                                  [&] {
                                    out = detection_postprocess_cpu_typed<scalar_t>(
                                        class_logits, box_regression, proposals, image_begin, image_end,
                                        image_sizes, weights, score_thresh, nms_thresh, detections_per_img,
                                        min_size, bbox_xform_clip);
                                  });
  return {out[0], out[1], out[2], out[3]};
}

// values [sum(counts), ...] (image by image) as [N, limit, ...]: image i's rows first, zeros after.
at::Tensor pad_per_image(const at::Tensor& values, const at::Tensor& counts, int64_t limit) {
  std::vector<int64_t> shape{counts.size(0), limit};
  for (int64_t d = 1; d < values.dim(); ++d) shape.push_back(values.size(d));
  at::Tensor out = at::zeros(shape, values.options());
  const int64_t* count = counts.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t i = 0; i < counts.size(0); ++i) {
    out.select(0, i).narrow(0, 0, count[i]).copy_(values.narrow(0, start, count[i]));
    start += count[i];
  }
  return out;
}

// The padded ops on the CPU: the fused kernels, their results padded (the CPU has no graph to capture).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rpn_proposals_padded_cpu(
    const at::Tensor& objectness, const at::Tensor& deltas, const at::Tensor& anchors,
    at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes, int64_t pre_nms_top_n, int64_t post_nms_top_n,
    double nms_thresh, double score_thresh, double min_size, at::ArrayRef<double> weights, double bbox_xform_clip) {
  FRCNN_CHECK(post_nms_top_n >= 0, "rpn_proposals_padded: post_nms_top_n must be >= 0 (the padded size), got ",
              post_nms_top_n);
  const auto [boxes, scores, counts] = rpn_proposals_cpu(objectness, deltas, anchors, num_anchors_per_level,
                                                         image_sizes, pre_nms_top_n, post_nms_top_n, nms_thresh,
                                                         score_thresh, min_size, weights, bbox_xform_clip);
  return {pad_per_image(boxes, counts, post_nms_top_n), pad_per_image(scores, counts, post_nms_top_n), counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> detection_postprocess_padded_cpu(
    const at::Tensor& class_logits, const at::Tensor& box_regression, const at::Tensor& proposals,
    const at::Tensor& proposal_counts, at::IntArrayRef image_sizes, at::ArrayRef<double> weights, double score_thresh,
    double nms_thresh, int64_t detections_per_img, double min_size, double bbox_xform_clip) {
  const int64_t per_image = check_detection_padded_inputs(class_logits, box_regression, proposals, proposal_counts,
                                                          image_sizes, weights, detections_per_img);
  const at::Tensor real = proposal_counts.contiguous();
  std::vector<int64_t> image_begin, image_end;
  for (int64_t i = 0; i < real.size(0); ++i) {
    const int64_t count = real.data_ptr<int64_t>()[i];
    FRCNN_CHECK(count >= 0 && count <= per_image, "detection_postprocess_padded: proposal_counts[", i, "] = ",
                count, " is outside [0, ", per_image, "] (the proposal rows per image)");
    image_begin.push_back(i * per_image);
    image_end.push_back(i * per_image + count);
  }
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, class_logits.scalar_type(),
                                  "detection_postprocess_padded_cpu", [&] {
                                    out = detection_postprocess_cpu_typed<scalar_t>(
                                        class_logits, box_regression, proposals, image_begin, image_end,
                                        image_sizes, weights, score_thresh, nms_thresh, detections_per_img,
                                        min_size, bbox_xform_clip);
                                  });
  const at::Tensor& counts = out[3];
  return {pad_per_image(out[0], counts, detections_per_img), pad_per_image(out[1], counts, detections_per_img),
          pad_per_image(out[2], counts, detections_per_img), counts};
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("rpn_proposals", &fasterrcnn_ext::rpn_proposals_cpu);
  m.impl("detection_postprocess", &fasterrcnn_ext::detection_postprocess_cpu);
  m.impl("rpn_proposals_padded", &fasterrcnn_ext::rpn_proposals_padded_cpu);
  m.impl("detection_postprocess_padded", &fasterrcnn_ext::detection_postprocess_padded_cpu);
}
