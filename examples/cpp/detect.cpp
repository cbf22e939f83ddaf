// detect: run a fasterrcnn_ext detector from C++, with no Python.
//
//   detect OP_LIBRARY torchscript|aoti MODEL IMAGE HEIGHT WIDTH
//
// OP_LIBRARY is the fasterrcnn_ext op library (python -c "import fasterrcnn_ext; print(fasterrcnn_ext.library_path())"),
// loaded before the model so that its static initializers register torch.ops.fasterrcnn_ext.*. MODEL is a file of
// `fasterrcnn-ext export --format torchscript` (torch.jit.script of the detector: it takes a list of [3, H, W]
// images and returns (losses, detections)) or `--format aoti` (an AOTInductor package, for HEIGHT x WIDTH images;
// it returns boxes, labels, scores). IMAGE holds HEIGHT x WIDTH x 3 float32 values in [0, 1], channel first
// ([3, H, W], native byte order). The detections go to stdout as
//   {"boxes": [[x1, y1, x2, y2], ...], "labels": [...], "scores": [...]}
#include <dlfcn.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

namespace {

at::Tensor read_image(const std::string& path, int64_t height, int64_t width) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open the image file " + path);
  auto image = torch::empty({3, height, width}, torch::kFloat32);
  const auto bytes = static_cast<std::streamsize>(image.numel() * sizeof(float));
  file.read(reinterpret_cast<char*>(image.data_ptr<float>()), bytes);
  if (file.gcount() != bytes || file.peek() != EOF) {
    throw std::runtime_error(path + " does not hold 3 x " + std::to_string(height) + " x " + std::to_string(width) +
                             " float32 values");
  }
  return image;
}

void print_json(const at::Tensor& boxes, const at::Tensor& labels, const at::Tensor& scores) {
  auto b = boxes.to(torch::kFloat32).contiguous();
  auto l = labels.to(torch::kInt64).contiguous();
  auto s = scores.to(torch::kFloat32).contiguous();
  const int64_t n = b.size(0);
  std::string out = "{\"boxes\": [";
  char number[32];
  for (int64_t i = 0; i < n; ++i) {
    out += i ? ", [" : "[";
    for (int64_t j = 0; j < 4; ++j) {
      std::snprintf(number, sizeof(number), "%.9g", b[i][j].item<float>());
      out += (j ? ", " : "") + std::string(number);
    }
    out += "]";
  }
  out += "], \"labels\": [";
  for (int64_t i = 0; i < n; ++i) out += (i ? ", " : "") + std::to_string(l[i].item<int64_t>());
  out += "], \"scores\": [";
  for (int64_t i = 0; i < n; ++i) {
    std::snprintf(number, sizeof(number), "%.9g", s[i].item<float>());
    out += (i ? ", " : "") + std::string(number);
  }
  std::cout << out << "]}" << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: detect OP_LIBRARY torchscript|aoti MODEL IMAGE HEIGHT WIDTH\n";
    return 2;
  }
  const std::string library = argv[1], format = argv[2], model_path = argv[3], image_path = argv[4];
  try {
    // RTLD_NOW: a symbol the library cannot resolve without Python would fail here, not mid-run.
    if (dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::cerr << "cannot load the op library: " << dlerror() << "\n";
      return 1;
    }
    const auto image = read_image(image_path, std::stoll(argv[5]), std::stoll(argv[6]));
    torch::NoGradGuard no_grad;
    if (format == "torchscript") {
      auto module = torch::jit::load(model_path);
      module.eval();
      c10::List<at::Tensor> images;
      images.push_back(image);
      // (losses, detections): one dict of boxes, labels, scores per image.
      auto detections = module.forward({images}).toTuple()->elements()[1].toList();
      auto first = detections.get(0).toGenericDict();
      print_json(first.at("boxes").toTensor(), first.at("labels").toTensor(), first.at("scores").toTensor());
    } else if (format == "aoti") {
      torch::inductor::AOTIModelPackageLoader loader(model_path);
      // The package's inputs and outputs flattened: one image in; its boxes, labels and scores out.
      auto outputs = loader.run({image.contiguous()});
      if (outputs.size() != 3) throw std::runtime_error("expected 3 outputs, got " + std::to_string(outputs.size()));
      print_json(outputs[0], outputs[1], outputs[2]);
    } else {
      std::cerr << "format must be torchscript or aoti, got " << format << "\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::cerr << "detect: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
