// The Python module of the defect_fast native extension.
//
// The ops themselves are registered with the dispatcher by TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL blocks in csrc/<op>/ when this shared library is loaded; Python reaches them
// as torch.ops.defect_fast.<op>. This file only adds build_info(), which says what was compiled.
//
// Compile-time definitions set by defect_fast/ops/_native.py (JIT) and setup.py (ahead of time):
//   DEFECT_FAST_WITH_CUDA       the CUDA kernels (csrc/<op>/cuda/) are part of the build
//   DEFECT_FAST_CUDA_ARCHS      TORCH_CUDA_ARCH_LIST used, with ';' and ' ' written as '_'
//   DEFECT_FAST_SOURCE_DIGEST   digest of the csrc tree the library was built from
//   DEFECT_FAST_BUILD_KIND      jit or aot
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKey.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>
#include <utility>
#include <vector>

#if defined(DEFECT_FAST_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#define DF_STRINGIFY_(...) #__VA_ARGS__
#define DF_STRINGIFY(...) DF_STRINGIFY_(__VA_ARGS__)

namespace py = pybind11;

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

// {op name: [dispatch keys with a kernel]} for every defect_fast:: op known to the dispatcher.
py::dict registered_ops() {
  const std::vector<std::pair<c10::DispatchKey, const char*>> keys = {
      {c10::DispatchKey::CPU, "CPU"},
      {c10::DispatchKey::CUDA, "CUDA"},
      {c10::DispatchKey::Meta, "Meta"},
      {c10::DispatchKey::AutogradCPU, "Autograd"},
  };
  py::dict ops;
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const c10::OperatorName& name : dispatcher.getAllOpNames()) {
    const std::string prefix = "defect_fast::";
    if (name.name.compare(0, prefix.size(), prefix) != 0) {
      continue;
    }
    auto handle = dispatcher.findOp(name);
    py::list backends;
    if (handle.has_value()) {
      for (const auto& key : keys) {
        if (handle->hasKernelForDispatchKey(key.first)) {
          backends.append(key.second);
        }
      }
    }
    std::string full = name.name.substr(prefix.size());
    if (!name.overload_name.empty()) {
      full += "." + name.overload_name;
    }
    ops[py::str(full)] = backends;
  }
  return ops;
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  info["compiler"] = compiler();
  info["cplusplus"] = static_cast<long>(__cplusplus);
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(DEFECT_FAST_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#if defined(DEFECT_FAST_CUDA_ARCHS)
  std::string archs = DF_STRINGIFY(DEFECT_FAST_CUDA_ARCHS);
  for (char& c : archs) {
    if (c == '_') {
      c = ';';
    }
  }
  info["cuda_arch_list"] = archs;
#else
  info["cuda_arch_list"] = py::none();
#endif
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_arch_list"] = py::none();
#endif
#if defined(DEFECT_FAST_SOURCE_DIGEST)
  info["source_digest"] = DF_STRINGIFY(DEFECT_FAST_SOURCE_DIGEST);
#else
  info["source_digest"] = py::none();
#endif
#if defined(DEFECT_FAST_BUILD_KIND)
  info["build_kind"] = DF_STRINGIFY(DEFECT_FAST_BUILD_KIND);
#else
  info["build_kind"] = py::none();
#endif
  info["ops"] = registered_ops();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "defect_fast native kernels; the ops are torch.ops.defect_fast.*";
  m.def("build_info", &build_info,
        "What this build contains: torch version built against, compiler, OpenMP, CUDA (version and arch "
        "list), source digest, and the registered defect_fast ops with their backends.");
}
