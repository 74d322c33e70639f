// Runs an AOTInductor package that calls the ditrt ops from C++, with no Python: dlopen the op library (which
// registers torch.ops.ditrt.* in this process and finds libditkernels.so beside itself), load the package with
// torch::inductor::AOTIModelPackageLoader, run it, write the first output.
//
//   run_package OPS_LIBRARY|- PACKAGE.pt2 OUTPUT.bin INPUT.bin:D0,D1,... [INPUT.bin:...]
//
// Tensors are raw little-endian float32, C-contiguous, shapes given on the command line. "-" as OPS_LIBRARY loads
// no library (the package must then fail: the ops exist only once a library registered them). Prints the output's
// shape on success; exit code 2 on usage or load errors, 3 when the package fails.
// Built by tests/test_cpp_ops.py with g++ against the installed torch (torch/include, -ltorch -ltorch_cpu -lc10).

#include <ATen/ops/from_blob.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

at::Tensor read_tensor(const std::string& spec) {
  size_t colon = spec.rfind(':');
  if (colon == std::string::npos) {
    throw std::runtime_error("input " + spec + " has no :D0,D1,... shape");
  }
  std::vector<int64_t> shape;
  std::stringstream dims(spec.substr(colon + 1));
  for (std::string d; std::getline(dims, d, ',');) {
    shape.push_back(std::stoll(d));
  }
  std::ifstream file(spec.substr(0, colon), std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  at::Tensor t = at::from_blob(bytes.data(), shape, at::kFloat).clone();
  if (static_cast<size_t>(t.nbytes()) != bytes.size()) {
    throw std::runtime_error("input " + spec + ": file size does not match the shape");
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: run_package OPS_LIBRARY|- PACKAGE.pt2 OUTPUT.bin INPUT.bin:D0,D1,... [...]\n";
    return 2;
  }
  std::string library = argv[1];
  if (library != "-" && dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "dlopen " << library << ": " << dlerror() << "\n";
    return 2;
  }
  std::vector<at::Tensor> inputs;
  try {
    for (int i = 4; i < argc; ++i) {
      inputs.push_back(read_tensor(argv[i]));
    }
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    std::vector<at::Tensor> outputs = loader.run(inputs);
    at::Tensor out = outputs.at(0).to(at::kFloat).contiguous();
    std::ofstream(argv[3], std::ios::binary).write(static_cast<const char*>(out.const_data_ptr()), out.nbytes());
    std::cout << "output " << out.sizes() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "package failed: " << e.what() << "\n";
    return 3;
  }
  return 0;
}
