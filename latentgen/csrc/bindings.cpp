// The Python module of latentgen's compiled CPU kernels (latentgen/nn/native_kernels.py builds and loads it).
// Only this file includes torch/extension.h, the slowest header to compile; the kernels include ATen alone.
#include <torch/extension.h>

#include <optional>

namespace latentgen {
at::Tensor softmax_bf16_(at::Tensor scores);
at::Tensor geglu_bf16(const at::Tensor& projected);
at::Tensor group_norm_silu_bf16(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                                double eps, const std::optional<at::Tensor>& shift);
}  // namespace latentgen

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_bf16_", &latentgen::softmax_bf16_,
        "In-place softmax over the last dimension of a contiguous bf16 CPU tensor");
  m.def("geglu_bf16", &latentgen::geglu_bf16,
        "value * GELU(gate) of a contiguous bf16 CPU tensor whose last dimension holds value then gate");
  m.def("group_norm_silu_bf16", &latentgen::group_norm_silu_bf16,
        "SiLU(GroupNorm(x + shift[:, :, None, None])) of a 4-d bf16 CPU tensor (contiguous or channels-last)",
        pybind11::arg("x"), pybind11::arg("groups"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"), pybind11::arg("shift") = pybind11::none());
}
