// Row softmax of a bf16 tensor, in place, for the blocked attention on the CPU
// (latentgen/nn/native_kernels.py says why and when it is used).
//
// torch's bf16 softmax widens each row, exponentiates with an exp accurate to 1 ulp and narrows it
// again in separate passes into a new tensor. The probabilities are rounded to bf16 (8 significant
// bits) right after, so ATen's fast exp (`fexp_u20`: 2^x as 2^integer times a cubic, Malossi et al.
// 2015) is accurate enough, and the three passes run over one row held as floats in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

namespace latentgen {
namespace {

using at::BFloat16;
using FloatVec = at::vec::Vectorized<float>;
using Bf16Vec = at::vec::Vectorized<BFloat16>;

void softmax_row(BFloat16* row, float* buffer, int64_t length) {
  constexpr int64_t kStep = Bf16Vec::size();  // two float vectors per bf16 vector
  const int64_t vectorised = length - length % kStep;
  // Widen into the buffer and find the maximum.
  FloatVec max_vec(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < vectorised; i += kStep) {
    auto [low, high] = at::vec::convert_to_float<BFloat16>(Bf16Vec::loadu(row + i));
    low.store(buffer + i);
    high.store(buffer + i + FloatVec::size());
    max_vec = at::vec::maximum(max_vec, at::vec::maximum(low, high));
  }
  float max_value = at::vec::vec_reduce_all<float>(
      [](FloatVec& a, FloatVec& b) { return at::vec::maximum(a, b); }, max_vec);
  for (int64_t i = vectorised; i < length; ++i) {
    buffer[i] = static_cast<float>(row[i]);
    max_value = std::max(max_value, buffer[i]);
  }
  // Exponentiate in place in the buffer and sum.
  const FloatVec shift(max_value);
  FloatVec sum_vec(0.f);
  const int64_t float_vectorised = length - length % FloatVec::size();
  for (int64_t i = 0; i < float_vectorised; i += FloatVec::size()) {
    FloatVec e = (FloatVec::loadu(buffer + i) - shift).fexp_u20();
    e.store(buffer + i);
    sum_vec = sum_vec + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](FloatVec& a, FloatVec& b) { return a + b; }, sum_vec);
  for (int64_t i = float_vectorised; i < length; ++i) {
    buffer[i] = std::exp(buffer[i] - max_value);
    sum += buffer[i];
  }
  // Normalise and narrow back into the row (round to nearest even).
  const float inverse = 1.f / sum;
  const FloatVec scale(inverse);
  for (int64_t i = 0; i < vectorised; i += kStep) {
    FloatVec low = FloatVec::loadu(buffer + i) * scale;
    FloatVec high = FloatVec::loadu(buffer + i + FloatVec::size()) * scale;
    at::vec::convert_from_float<BFloat16>(low, high).store(row + i);
  }
  for (int64_t i = vectorised; i < length; ++i) {
    row[i] = static_cast<BFloat16>(buffer[i] * inverse);
  }
}

}  // namespace

at::Tensor softmax_bf16_(at::Tensor scores) {
  TORCH_CHECK(scores.device().is_cpu(), "softmax_bf16_: the scores must be on the CPU");
  TORCH_CHECK(scores.scalar_type() == at::kBFloat16, "softmax_bf16_: the scores must be bfloat16, got ",
              scores.scalar_type());
  TORCH_CHECK(scores.is_contiguous(), "softmax_bf16_: the scores must be contiguous");
  TORCH_CHECK(scores.dim() >= 1 && scores.size(-1) > 0, "softmax_bf16_: the scores need a non-empty last dimension");
  const int64_t length = scores.size(-1);
  const int64_t rows = scores.numel() / length;
  BFloat16* data = scores.data_ptr<BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(length);
    for (int64_t r = begin; r < end; ++r) {
      softmax_row(data + r * length, buffer.data(), length);
    }
  });
  return scores;
}

}  // namespace latentgen
