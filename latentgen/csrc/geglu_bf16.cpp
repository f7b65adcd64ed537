// GEGLU's gate of a bf16 tensor in one pass: value * GELU(gate), the two halves of the last dimension
// (latentgen/nn/native_kernels.py says when it is used).
//
// torch runs GELU over the gate half into a new bf16 tensor, then multiplies (two passes, the GELU rounded to
// bf16 before the product). Here each pair is widened once, the exact (erf-based) GELU and the product are taken
// in float, and the result is rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>  // also brings convert_from_float's definition
#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace latentgen {
namespace {

using at::BFloat16;
using FloatVec = at::vec::Vectorized<float>;
using Bf16Vec = at::vec::Vectorized<BFloat16>;

// A vector division takes about 16 cycles, the reciprocal estimate and one Newton step about 4 (22 bits).
inline FloatVec reciprocal(const FloatVec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const FloatVec r(_mm512_rcp14_ps(d));
#else
  const FloatVec r(_mm256_rcp_ps(d));
#endif
  return r * (FloatVec(2.f) - d * r);
}

// GELU(x) = x * Phi(x), Phi the normal distribution function. With a = |x| / sqrt(2), 1 - Phi(|x|) = erfc(a) / 2 is
// taken as t * P(t) * exp(-a^2) / 2 with t = 1 / (1 + p a) (Abramowitz and Stegun 7.1.26, absolute error below
// 1.5e-7) and ATen's fast polynomial exp (fexp_u20), both far below the bf16 rounding that follows
// (tests/nn/test_native_kernels.py: never further from float64 than torch's bf16 GEGLU).
inline FloatVec gelu(const FloatVec& x) {
  const FloatVec one(1.f), half(0.5f);
  const FloatVec a = x.abs() * FloatVec(static_cast<float>(M_SQRT1_2));
  const FloatVec t = reciprocal(at::vec::fmadd(FloatVec(0.3275911f), a, one));
  FloatVec poly = at::vec::fmadd(FloatVec(1.061405429f), t, FloatVec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, FloatVec(1.421413741f));
  poly = at::vec::fmadd(poly, t, FloatVec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, FloatVec(0.254829592f));
  const FloatVec tail = half * poly * t * (a * a).neg().fexp_u20();  // 1 - Phi(|x|)
  return x * FloatVec::blendv(one - tail, tail, x < FloatVec(0.f));
}

inline float gelu(float x) { return 0.5f * x * (1.f + std::erf(x * static_cast<float>(M_SQRT1_2))); }

void geglu_row(const BFloat16* value, const BFloat16* gate, BFloat16* out, int64_t width) {
  constexpr int64_t kStep = Bf16Vec::size();
  const int64_t vectorised = width - width % kStep;
  for (int64_t i = 0; i < vectorised; i += kStep) {
    auto [v_low, v_high] = at::vec::convert_to_float<BFloat16>(Bf16Vec::loadu(value + i));
    auto [g_low, g_high] = at::vec::convert_to_float<BFloat16>(Bf16Vec::loadu(gate + i));
    at::vec::convert_from_float<BFloat16>(v_low * gelu(g_low), v_high * gelu(g_high)).store(out + i);
  }
  for (int64_t i = vectorised; i < width; ++i) {
    out[i] = static_cast<BFloat16>(static_cast<float>(value[i]) * gelu(static_cast<float>(gate[i])));
  }
}

}  // namespace

at::Tensor geglu_bf16(const at::Tensor& projected) {
  TORCH_CHECK(projected.device().is_cpu(), "geglu_bf16: the input must be on the CPU");
  TORCH_CHECK(projected.scalar_type() == at::kBFloat16, "geglu_bf16: the input must be bfloat16, got ",
              projected.scalar_type());
  TORCH_CHECK(projected.is_contiguous(), "geglu_bf16: the input must be contiguous");
  TORCH_CHECK(projected.dim() >= 1 && projected.size(-1) % 2 == 0,
              "geglu_bf16: the last dimension must be even (value and gate halves), got shape ", projected.sizes());
  const int64_t width = projected.size(-1) / 2;
  auto shape = projected.sizes().vec();
  shape.back() = width;
  at::Tensor out = at::empty(shape, projected.options());
  if (out.numel() == 0) {
    return out;
  }
  const int64_t rows = out.numel() / width;
  const BFloat16* in = projected.data_ptr<BFloat16>();
  BFloat16* result = out.data_ptr<BFloat16>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const BFloat16* row = in + r * 2 * width;
      geglu_row(row, row + width, result + r * width, width);
    }
  });
  return out;
}

}  // namespace latentgen
