// CPU kernel of conv3x3_winograd: Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, 2016).
//
// A 3x3 convolution costs 9 multiply-adds per output and input channel; F(4x4, 3x3) computes each 4x4 output tile
// from a 6x6 input tile with 36, so 4 times fewer, as 36 matrix products [tiles x C] x [C x K] that run at the
// BLAS's speed. The 256-channel 3x3 convolutions of the FPN and the RPN head on the stride-4 map are the largest
// layers of an R50-FPN detector, and oneDNN's direct convolution already runs them near this CPU's peak: the
// arithmetic saved is the gain.
//
// Per chunk of tiles (sized so its transformed input and products stay in cache): the input transform
// V = B^T d B of every tile and channel, the 36 products M = V U, then the output transform Y = A^T M A, plus bias
// and ReLU. Tiles are independent, so chunks run in parallel without synchronisation. Input and output are NHWC
// (channels_last): each transform is a loop over contiguous channels, written with explicit SIMD.
// Rounding: the transforms scale by up to 8 and sum up to 6 terms twice; in float32 the results differ from a
// direct convolution by about 1e-5 of the output's magnitude (tests bound it against float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/common/checks.h"

#include "ops/common/host_device.h"

namespace fasterrcnn_ext {
namespace {

constexpr int kTile = 6;                           // input tile side (output tile 4 + 3 - 1)
constexpr int kOut = 4;                            // output tile side
constexpr int64_t kTileInputs = kTile * kTile;     // 36 transformed inputs per tile
// Tiles per chunk (at most): 64 tiles of 256 channels make 2.4 MB of transformed input and as much of products per
// thread (64 to 128 measured fastest at 256 channels; 32 clearly slower).
constexpr int64_t kTilesPerChunk = 64;
constexpr int64_t kPad = 64 / sizeof(float);  // values between the chunk's matrices (see the kernel)

struct Geometry {
  int64_t n, c, h, w, k, tiles_h, tiles_w;
  int64_t tiles() const { return n * tiles_h * tiles_w; }
};

// Tile `tile` (numbered image by image, row by row): its image and the top-left output pixel it covers.
struct TileOrigin {
  int64_t img, y, x;
};

inline TileOrigin tile_origin(const Geometry& g, int64_t tile) {
  const int64_t per_image = g.tiles_h * g.tiles_w, rem = tile % per_image;
  return {tile / per_image, kOut * (rem / g.tiles_w), kOut * (rem % g.tiles_w)};
}

// Explicit SIMD: GCC/Clang vector extensions of 64 bytes, lowered to AVX-512, AVX2 or SSE by the clone that
// inlines them. L is such a vector, or T itself for the channels left over.
template <typename T>
using Vec64 = T __attribute__((vector_size(64)));

template <typename L, typename T>
__attribute__((always_inline)) inline L load_lanes(const T* p) {
  L v;
  std::memcpy(&v, p, sizeof(L));
  return v;
}

template <typename L, typename T>
__attribute__((always_inline)) inline void store_lanes(T* p, L v) {
  std::memcpy(p, &v, sizeof(L));
}

// B^T d for one column d0..d5 of a 6x6 tile (also d B for one row: B^T is applied on both sides).
template <typename L>
__attribute__((always_inline)) inline void b_transform(L d0, L d1, L d2, L d3, L d4, L d5, L* out) {
  out[0] = L(d0 * 4) - L(d2 * 5) + d4;
  out[1] = (d4 + d3) - L((d1 + d2) * 4);
  out[2] = (d4 - d3) + L((d1 - d2) * 4);
  out[3] = (d4 - d2) + L((d3 - d1) * 2);
  out[4] = (d4 - d2) - L((d3 - d1) * 2);
  out[5] = L(d1 * 4) - L(d3 * 5) + d5;
}

// A^T m for one column m0..m5 (also m A for one row).
template <typename L>
__attribute__((always_inline)) inline void a_transform(L m0, L m1, L m2, L m3, L m4, L m5, L* out) {
  const L sum12 = m1 + m2, diff12 = m1 - m2, sum34 = m3 + m4, diff34 = m3 - m4;
  out[0] = m0 + sum12 + sum34;
  out[1] = diff12 + L(diff34 * 2);
  out[2] = sum12 + L(sum34 * 4);
  out[3] = diff12 + L(diff34 * 8) + m5;
}

// V = B^T d B at channels [ch, ch + lanes of L): patch row r is rows[r], its 6 pixels C apart; V[xi] goes to
// v[xi] + ch.
template <typename L, typename T>
__attribute__((always_inline)) inline void input_lanes(const T* const* rows, int64_t C, T* const* v, int64_t ch) {
  L cols[kTile][kTile];  // cols[s] = B^T d of column s
  for (int s = 0; s < kTile; ++s) {
    const int64_t at = s * C + ch;
    b_transform<L>(load_lanes<L>(rows[0] + at), load_lanes<L>(rows[1] + at), load_lanes<L>(rows[2] + at),
                   load_lanes<L>(rows[3] + at), load_lanes<L>(rows[4] + at), load_lanes<L>(rows[5] + at), cols[s]);
  }
  for (int r = 0; r < kTile; ++r) {
    L out[kTile];
    b_transform<L>(cols[0][r], cols[1][r], cols[2][r], cols[3][r], cols[4][r], cols[5][r], out);
    for (int s = 0; s < kTile; ++s) store_lanes(v[r * kTile + s] + ch, out[s]);
  }
}

// The transforms are built for AVX-512 and AVX2 as well as the baseline, picked at load time by the CPU.
template <typename T>
FRCNN_CPU_MULTIVERSION_ARCH void input_transform_tile(const T* const* rows, int64_t C, T* const* v) {
  constexpr int64_t kLanes = sizeof(Vec64<T>) / sizeof(T);
  int64_t ch = 0;
  for (; ch + kLanes <= C; ch += kLanes) input_lanes<Vec64<T>>(rows, C, v, ch);
  for (; ch < C; ++ch) input_lanes<T>(rows, C, v, ch);
}

// Y = A^T M A + bias (then ReLU) at channels [ch, ch + lanes of L): M[xi] at m[xi] + ch, output pixel (i, j) at
// y[4 i + j] + ch.
template <bool kRelu, typename L, typename T>
__attribute__((always_inline)) inline void output_lanes(const T* const* m, const T* bias, T* const* y, int64_t ch) {
  L cols[kTile][kOut];  // cols[b] = A^T M of column b
  for (int b = 0; b < kTile; ++b) {
    a_transform<L>(load_lanes<L>(m[b] + ch), load_lanes<L>(m[kTile + b] + ch), load_lanes<L>(m[2 * kTile + b] + ch),
                   load_lanes<L>(m[3 * kTile + b] + ch), load_lanes<L>(m[4 * kTile + b] + ch),
                   load_lanes<L>(m[5 * kTile + b] + ch), cols[b]);
  }
  const L b = load_lanes<L>(bias + ch);
  for (int i = 0; i < kOut; ++i) {
    L out[kOut];
    a_transform<L>(cols[0][i], cols[1][i], cols[2][i], cols[3][i], cols[4][i], cols[5][i], out);
    for (int j = 0; j < kOut; ++j) {
      L value = out[j] + b;
      if (kRelu) value = value < L{} ? L{} : value;  // NaN stays NaN, as torch.relu keeps it
      store_lanes(y[i * kOut + j] + ch, value);
    }
  }
}

template <bool kRelu, typename T>
FRCNN_CPU_MULTIVERSION_ARCH void output_transform_tile(const T* const* m, int64_t K, const T* bias, T* const* y) {
  constexpr int64_t kLanes = sizeof(Vec64<T>) / sizeof(T);
  int64_t ch = 0;
  for (; ch + kLanes <= K; ch += kLanes) output_lanes<kRelu, Vec64<T>>(m, bias, y, ch);
  for (; ch < K; ++ch) output_lanes<kRelu, T>(m, bias, y, ch);
}

// V for the tiles [first, first + count): v + xi * stride_xi + t * C holds V[xi] of tile t. The patch of tile (i, j)
// is the 6x6 input at (4 i - 1, 4 j - 1), zero outside the map: a patch row inside the map is read in place (its 6
// pixels are contiguous in NHWC); a row crossing the border is assembled in `scratch` (36 * C values) with zeros.
template <typename T>
void input_transform(const T* x, const Geometry& g, int64_t first, int64_t count, int64_t stride_xi, T* scratch,
                     T* v) {
  const int64_t C = g.c;
  for (int64_t t = 0; t < count; ++t) {
    const TileOrigin o = tile_origin(g, first + t);
    const int64_t img = o.img, y0 = o.y - 1, x0 = o.x - 1;  // the patch starts one pixel before (padding 1)
    const T* rows[kTile];
    for (int r = 0; r < kTile; ++r) {
      const int64_t y = y0 + r;
      const T* row = y >= 0 && y < g.h ? x + (img * g.h + y) * g.w * C : nullptr;
      if (row != nullptr && x0 >= 0 && x0 + kTile <= g.w) {
        rows[r] = row + x0 * C;
        continue;
      }
      T* assembled = scratch + r * kTile * C;
      for (int s = 0; s < kTile; ++s) {
        const int64_t xx = x0 + s;
        if (row != nullptr && xx >= 0 && xx < g.w) {
          std::copy(row + xx * C, row + (xx + 1) * C, assembled + s * C);
        } else {
          std::fill(assembled + s * C, assembled + (s + 1) * C, T(0));
        }
      }
      rows[r] = assembled;
    }
    T* vt[kTileInputs];
    for (int xi = 0; xi < kTileInputs; ++xi) vt[xi] = v + xi * stride_xi + t * C;
    input_transform_tile(rows, C, vt);
  }
}

// Y for the tiles [first, first + count), written to the NHWC output; the pixels of a border tile that fall outside
// the map go to `discard` (16 * K values).
template <typename T>
void output_transform(const T* m, const Geometry& g, int64_t first, int64_t count, int64_t stride_xi,
                      const T* bias, bool relu, T* discard, T* y) {
  const int64_t K = g.k;
  for (int64_t t = 0; t < count; ++t) {
    const TileOrigin o = tile_origin(g, first + t);
    const int64_t img = o.img, oy = o.y, ox = o.x;
    T* yt[kOut * kOut];
    for (int i = 0; i < kOut; ++i) {
      for (int j = 0; j < kOut; ++j) {
        const bool inside = oy + i < g.h && ox + j < g.w;
        yt[i * kOut + j] = inside ? y + ((img * g.h + oy + i) * g.w + ox + j) * K : discard + (i * kOut + j) * K;
      }
    }
    const T* mt[kTileInputs];
    for (int xi = 0; xi < kTileInputs; ++xi) mt[xi] = m + xi * stride_xi + t * K;
    if (relu) {
      output_transform_tile<true>(mt, K, bias, yt);
    } else {
      output_transform_tile<false>(mt, K, bias, yt);
    }
  }
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, bool relu) {
  constexpr const char* op = "conv3x3_winograd";
  FRCNN_CHECK(input.dim() == 4, op, ": input must be [N, C, H, W], got shape ", input.sizes());
  FRCNN_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              ": input must be float32 or float64, got ", input.scalar_type());
  FRCNN_CHECK(weight.dim() == 3 && weight.size(0) == kTileInputs && weight.size(1) == input.size(1), op,
              ": transformed_weight must be [36, C, K] with C = input's ", input.size(1),
              " channels (ops.winograd_weight of a [K, C, 3, 3] weight), got shape ", weight.sizes());
  check_same_dtype(input, "input", weight, "transformed_weight", op);
  if (bias.has_value()) {
    FRCNN_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(2), op, ": bias must be [K] with K = ",
                weight.size(2), ", got shape ", bias->sizes());
    check_same_dtype(input, "input", *bias, "bias", op);
  }
  const Geometry g{input.size(0), input.size(1), input.size(2), input.size(3), weight.size(2),
                   (input.size(2) + kOut - 1) / kOut, (input.size(3) + kOut - 1) / kOut};
  at::Tensor out = at::empty({g.n, g.k, g.h, g.w}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  if (g.c == 0) {  // no input channels: every output is the bias
    if (bias.has_value()) {
      out.copy_(bias->view({1, -1, 1, 1}).expand_as(out));
    } else {
      out.zero_();
    }
    return relu ? out.relu_() : out;
  }
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor u = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  // Small maps (the stride-32 level has ~60 tiles) are split so that every thread gets a share.
  const int64_t tiles_per_chunk = std::clamp<int64_t>(
      (g.tiles() + at::get_num_threads() - 1) / at::get_num_threads(), 1, kTilesPerChunk);
  const int64_t chunks = (g.tiles() + tiles_per_chunk - 1) / tiles_per_chunk;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv3x3_winograd_cpu", [&] {
    // No bias: a zero one, so the output transform has one form.
    const std::vector<scalar_t> zero_bias(b.defined() ? 0 : g.k, scalar_t(0));
    const scalar_t* bias_data = b.defined() ? b.const_data_ptr<scalar_t>() : zero_bias.data();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(kTileInputs * std::max(g.c, g.k));
      // The 36 matrices of a chunk are padded apart by a cache line: at a power-of-two distance (32 tiles x 256
      // channels x 4 bytes) the transforms' 36 streams would all map to the same L1 cache set.
      const int64_t stride_v = tiles_per_chunk * g.c + kPad, stride_m = tiles_per_chunk * g.k + kPad;
      at::Tensor v = at::empty({kTileInputs * stride_v}, x.options().memory_format(at::MemoryFormat::Contiguous));
      at::Tensor m = at::empty({kTileInputs * stride_m}, v.options());
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t first = chunk * tiles_per_chunk, count = std::min(tiles_per_chunk, g.tiles() - first);
        input_transform<scalar_t>(x.const_data_ptr<scalar_t>(), g, first, count, stride_v, scratch.data(),
                                  v.data_ptr<scalar_t>());
        at::Tensor mc = m.as_strided({kTileInputs, count, g.k}, {stride_m, g.k, 1});
        at::bmm_out(mc, v.as_strided({kTileInputs, count, g.c}, {stride_v, g.c, 1}), u);
        output_transform<scalar_t>(m.const_data_ptr<scalar_t>(), g, first, count, stride_m, bias_data, relu,
                                   scratch.data(), out.data_ptr<scalar_t>());
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("conv3x3_winograd", &fasterrcnn_ext::conv3x3_winograd_cpu);
}
