// GroupNorm followed by SiLU over a bf16 feature map in two passes, with an optional per-channel shift added
// before the normalisation: the UNet ResBlock's `norm, SiLU` and `+ embedding, norm, SiLU`
// (latentgen/nn/native_kernels.py says when it is used).
//
// torch runs the shift, the GroupNorm and the SiLU as three operators, each reading and writing the whole map
// and rounding to bf16 in between. Here one pass gathers each group's statistics and one writes
// silu(x * a_c + b_c), a_c and b_c folding the group's mean and 1/std with the channel's weight and bias, taken in
// float and rounded once. Statistics: per-channel sums of (x - pivot) in float over blocks of rows, the pivot being
// the channel's first value (so that sums of squares do not cancel when the mean is large against the spread),
// combined per group in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <optional>
#include <vector>

namespace latentgen {
namespace {

using at::BFloat16;
using FloatVec = at::vec::Vectorized<float>;
using Bf16Vec = at::vec::Vectorized<BFloat16>;

constexpr int64_t kRowsPerBlock = 64;  // rows summed in float before the block's sums go into doubles

inline FloatVec silu(const FloatVec& x) { return x / (FloatVec(1.f) + x.neg().exp_u20()); }
inline float silu(float x) { return x / (1.f + std::exp(-x)); }

// Per-(sample, channel) sums of (x + shift - pivot) = (x - the first value) and its square over the spatial positions, in doubles.
struct ChannelSums {
  std::vector<double> sum, sum_sq;
  explicit ChannelSums(int64_t n) : sum(n, 0.0), sum_sq(n, 0.0) {}
};

// Channels last: each spatial position is a row of C contiguous values. Sums over rows [begin, end) of one sample.
void sum_rows(const BFloat16* x, int64_t channels, int64_t begin, int64_t end, const float* offset, float* block_sum,
              float* block_sum_sq) {
  constexpr int64_t kStep = Bf16Vec::size();
  const int64_t vectorised = channels - channels % kStep;
  for (int64_t c = 0; c < channels; ++c) {
    block_sum[c] = 0.f;
    block_sum_sq[c] = 0.f;
  }
  for (int64_t r = begin; r < end; ++r) {
    const BFloat16* row = x + r * channels;
    for (int64_t c = 0; c < vectorised; c += kStep) {
      auto [low, high] = at::vec::convert_to_float<BFloat16>(Bf16Vec::loadu(row + c));
      low = low + FloatVec::loadu(offset + c);
      high = high + FloatVec::loadu(offset + c + FloatVec::size());
      (FloatVec::loadu(block_sum + c) + low).store(block_sum + c);
      (FloatVec::loadu(block_sum + c + FloatVec::size()) + high).store(block_sum + c + FloatVec::size());
      at::vec::fmadd(low, low, FloatVec::loadu(block_sum_sq + c)).store(block_sum_sq + c);
      at::vec::fmadd(high, high, FloatVec::loadu(block_sum_sq + c + FloatVec::size()))
          .store(block_sum_sq + c + FloatVec::size());
    }
    for (int64_t c = vectorised; c < channels; ++c) {
      const float v = static_cast<float>(row[c]) + offset[c];
      block_sum[c] += v;
      block_sum_sq[c] += v * v;
    }
  }
}

void apply_rows(const BFloat16* x, BFloat16* y, int64_t channels, int64_t begin, int64_t end, const float* scale,
                const float* bias) {
  constexpr int64_t kStep = Bf16Vec::size();
  const int64_t vectorised = channels - channels % kStep;
  for (int64_t r = begin; r < end; ++r) {
    const BFloat16* row = x + r * channels;
    BFloat16* out = y + r * channels;
    for (int64_t c = 0; c < vectorised; c += kStep) {
      auto [low, high] = at::vec::convert_to_float<BFloat16>(Bf16Vec::loadu(row + c));
      low = at::vec::fmadd(low, FloatVec::loadu(scale + c), FloatVec::loadu(bias + c));
      high = at::vec::fmadd(high, FloatVec::loadu(scale + c + FloatVec::size()),
                            FloatVec::loadu(bias + c + FloatVec::size()));
      at::vec::convert_from_float<BFloat16>(silu(low), silu(high)).store(out + c);
    }
    for (int64_t c = vectorised; c < channels; ++c) {
      out[c] = static_cast<BFloat16>(silu(static_cast<float>(row[c]) * scale[c] + bias[c]));
    }
  }
}

// Contiguous (N, C, H, W): each (sample, channel) plane is `length` contiguous values.
void sum_plane(const BFloat16* plane, int64_t length, float offset, double& sum, double& sum_sq) {
  constexpr int64_t kStep = Bf16Vec::size();
  const int64_t vectorised = length - length % kStep;
  const FloatVec shift(offset);
  for (int64_t start = 0; start < length; start += kRowsPerBlock * kStep) {
    const int64_t stop = std::min(start + kRowsPerBlock * kStep, vectorised);
    FloatVec s(0.f), s2(0.f);
    for (int64_t i = start; i < stop; i += kStep) {
      auto [low, high] = at::vec::convert_to_float<BFloat16>(Bf16Vec::loadu(plane + i));
      low = low + shift;
      high = high + shift;
      s = s + low + high;
      s2 = at::vec::fmadd(low, low, at::vec::fmadd(high, high, s2));
    }
    sum += at::vec::vec_reduce_all<float>([](FloatVec& a, FloatVec& b) { return a + b; }, s);
    sum_sq += at::vec::vec_reduce_all<float>([](FloatVec& a, FloatVec& b) { return a + b; }, s2);
  }
  for (int64_t i = vectorised; i < length; ++i) {
    const double v = static_cast<double>(static_cast<float>(plane[i]) + offset);
    sum += v;
    sum_sq += v * v;
  }
}

void apply_plane(const BFloat16* plane, BFloat16* out, int64_t length, float scale, float bias) {
  constexpr int64_t kStep = Bf16Vec::size();
  const int64_t vectorised = length - length % kStep;
  const FloatVec a(scale), b(bias);
  for (int64_t i = 0; i < vectorised; i += kStep) {
    auto [low, high] = at::vec::convert_to_float<BFloat16>(Bf16Vec::loadu(plane + i));
    at::vec::convert_from_float<BFloat16>(silu(at::vec::fmadd(low, a, b)), silu(at::vec::fmadd(high, a, b)))
        .store(out + i);
  }
  for (int64_t i = vectorised; i < length; ++i) {
    out[i] = static_cast<BFloat16>(silu(static_cast<float>(plane[i]) * scale + bias));
  }
}

}  // namespace

at::Tensor group_norm_silu_bf16(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                                double eps, const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4,
              "group_norm_silu_bf16: x must be a 4-d bfloat16 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  const int64_t batch = x.size(0), channels = x.size(1), length = x.size(2) * x.size(3);
  TORCH_CHECK(groups > 0 && channels % groups == 0, "group_norm_silu_bf16: ", channels,
              " channels do not split into ", groups, " groups");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == channels &&
                  bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == channels,
              "group_norm_silu_bf16: weight and bias must be contiguous float32 tensors of ", channels, " values");
  if (shift.has_value()) {
    TORCH_CHECK(shift->scalar_type() == at::kFloat && shift->is_contiguous() && shift->dim() == 2 &&
                    shift->size(0) == batch && shift->size(1) == channels,
                "group_norm_silu_bf16: the shift must be a contiguous float32 (batch, channels) tensor");
  }
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  TORCH_CHECK(channels_last || x.is_contiguous(), "group_norm_silu_bf16: x must be contiguous or channels-last");
  at::Tensor y = at::empty_like(x);  // keeps x's memory format
  if (x.numel() == 0) {
    return y;
  }
  const BFloat16* in = x.data_ptr<BFloat16>();
  BFloat16* out = y.data_ptr<BFloat16>();
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float* s = shift.has_value() ? shift->data_ptr<float>() : nullptr;
  const int64_t per_group = channels / groups;
  const double count = static_cast<double>(per_group * length);

  // The sums are of x minus each channel's first value (offset = -first): the pivot of x + shift is first + shift,
  // so the shift itself drops out of them. scale, fused_bias: silu(x * scale + fused_bias) is the result.
  std::vector<float> offset(batch * channels), scale(batch * channels), fused_bias(batch * channels);
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      offset[n * channels + c] =
          -static_cast<float>(channels_last ? in[n * length * channels + c] : in[(n * channels + c) * length]);
    }
  }
  ChannelSums sums(batch * channels);
  if (channels_last) {
    for (int64_t n = 0; n < batch; ++n) {
      const int64_t blocks = (length + kRowsPerBlock - 1) / kRowsPerBlock;
      const int threads = at::get_num_threads();
      std::vector<double> thread_sum(threads * channels, 0.0), thread_sum_sq(threads * channels, 0.0);
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> block_sum(channels), block_sum_sq(channels);
        double* ts = thread_sum.data() + at::get_thread_num() * channels;
        double* ts2 = thread_sum_sq.data() + at::get_thread_num() * channels;
        for (int64_t blk = begin; blk < end; ++blk) {
          sum_rows(in + n * length * channels, channels, blk * kRowsPerBlock,
                   std::min(length, (blk + 1) * kRowsPerBlock), offset.data() + n * channels, block_sum.data(),
                   block_sum_sq.data());
          for (int64_t c = 0; c < channels; ++c) {
            ts[c] += block_sum[c];
            ts2[c] += block_sum_sq[c];
          }
        }
      });
      for (int t = 0; t < threads; ++t) {
        for (int64_t c = 0; c < channels; ++c) {
          sums.sum[n * channels + c] += thread_sum[t * channels + c];
          sums.sum_sq[n * channels + c] += thread_sum_sq[t * channels + c];
        }
      }
    }
  } else {
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        sum_plane(in + p * length, length, offset[p], sums.sum[p], sums.sum_sq[p]);
      }
    });
  }
  // Per group: mean and variance of x + shift from the channels' centred sums (in double), folded with the
  // channel's weight and bias into silu(x * scale + bias).
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      double total = 0.0, total_sq = 0.0;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const int64_t i = n * channels + c;
        const double p = (s ? s[i] : 0.0) - offset[i], s1 = sums.sum[i], s2 = sums.sum_sq[i];  // the pivot
        total += s1 + p * length;                                 // sum of (x + shift)
        total_sq += s2 + 2.0 * p * s1 + p * p * length;           // sum of (x + shift)^2
      }
      const double mean = total / count;
      const double variance = std::max(total_sq / count - mean * mean, 0.0);
      const double inverse_std = 1.0 / std::sqrt(variance + eps);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const int64_t i = n * channels + c;
        const double a = inverse_std * w[c];
        scale[i] = static_cast<float>(a);
        fused_bias[i] = static_cast<float>(((s ? s[i] : 0.0) - mean) * a + b[c]);
      }
    }
  }
  if (channels_last) {
    for (int64_t n = 0; n < batch; ++n) {
      at::parallel_for(0, length, kRowsPerBlock, [&](int64_t begin, int64_t end) {
        apply_rows(in + n * length * channels, out + n * length * channels, channels, begin, end,
                   scale.data() + n * channels, fused_bias.data() + n * channels);
      });
    }
  } else {
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        apply_plane(in + p * length, out + p * length, length, scale[p], fused_bias[p]);
      }
    });
  }
  return y;
}

}  // namespace latentgen
