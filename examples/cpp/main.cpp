// defect_fast_run: score one image with an exported defect_fast detector (TorchScript).
//
// Usage: defect_fast_run DETECTOR.ts IMAGE.png [MAP_OUT]
//   DETECTOR.ts  from `defect-fast export RUN --format torchscript --out DETECTOR.ts`; its graph takes
//                images uint8 [B, 3, S, S] (RGB, 0..255) and returns (maps float32 [B, S, S], scores [B]).
//   IMAGE.png    PNG of any bit depth, grey or colour, read to 8-bit RGB as the Python package reads
//                files: 16-bit grey scaled (65535 -> 255), 16-bit colour by its high byte (as PIL),
//                palette expanded, alpha dropped (not blended), gamma chunks ignored; an image that
//                is not S x S is resized (bilinear, antialiased, then rounded) to S x S first.
//   MAP_OUT      optional: the anomaly map [S, S]; "*.png" as 8-bit grey scaled to the map's maximum,
//                anything else as raw little-endian float32, row-major (S*S*4 bytes).
// Prints "score <value>" (the image score) on stdout; exit status 1 with a message on any error.
#include <png.h>
#include <torch/script.h>

#include <algorithm>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

struct PngErrors {
  std::jmp_buf jump;
  char message[256] = "";
};

void on_png_error(png_structp png, png_const_charp message) {
  auto* errors = static_cast<PngErrors*>(png_get_error_ptr(png));
  std::snprintf(errors->message, sizeof(errors->message), "%s", message);
  std::longjmp(errors->jump, 1);
}

void on_png_warning(png_structp, png_const_charp) {}

// Reads a PNG as 8-bit RGB, with the conversions the Python package's reader (PIL) makes; returns
// false with a message in `error`. libpng's simplified API is not used: it treats 16-bit samples as
// linear light, applies gAMA chunks and blends alpha onto black, which the Python side does not.
bool read_png_rgb(const std::string& path, std::vector<uint8_t>& pixels, int& height, int& width, std::string& error) {
  std::FILE* fp = std::fopen(path.c_str(), "rb");
  if (fp == nullptr) {
    error = path + ": cannot open";
    return false;
  }
  PngErrors errors;
  std::vector<png_bytep> rows;  // declared before the setjmp: nothing with a destructor is made after it
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &errors, on_png_error, on_png_warning);
  png_infop info = png == nullptr ? nullptr : png_create_info_struct(png);
  if (png == nullptr || info == nullptr) {
    png_destroy_read_struct(&png, &info, nullptr);
    std::fclose(fp);
    error = path + ": out of memory reading PNG";
    return false;
  }
  if (setjmp(errors.jump)) {
    png_destroy_read_struct(&png, &info, nullptr);
    std::fclose(fp);
    error = path + ": cannot read PNG (" + errors.message + ")";
    return false;
  }
  png_init_io(png, fp);
  png_read_info(png, info);
  const int depth = png_get_bit_depth(png, info), color = png_get_color_type(png, info);
  if (depth == 16) {
    if (color == PNG_COLOR_TYPE_GRAY) {
      png_set_scale_16(png);  // round(v * 255 / 65535), PIL's "I;16" -> "L"
    } else {
      png_set_strip_16(png);  // the high byte, PIL's 16-bit RGB/RGBA/LA
    }
  }
  png_set_expand(png);       // palette -> RGB, grey of 1-4 bits -> 8 bits, tRNS -> alpha
  png_set_strip_alpha(png);  // alpha dropped, not composited
  if (!(color & PNG_COLOR_MASK_COLOR)) png_set_gray_to_rgb(png);
  png_read_update_info(png, info);
  height = static_cast<int>(png_get_image_height(png, info));
  width = static_cast<int>(png_get_image_width(png, info));
  if (png_get_channels(png, info) != 3 || png_get_bit_depth(png, info) != 8) {
    png_error(png, "unexpected layout after conversion to 8-bit RGB");
  }
  pixels.resize(static_cast<size_t>(height) * width * 3);
  rows.resize(height);
  for (int y = 0; y < height; ++y) rows[y] = pixels.data() + static_cast<size_t>(y) * width * 3;
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  std::fclose(fp);
  return true;
}

bool write_png_grey(const std::string& path, const std::vector<uint8_t>& grey, int height, int width) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = PNG_FORMAT_GRAY;
  return png_image_write_to_file(&image, path.c_str(), 0, grey.data(), 0, nullptr) != 0;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " DETECTOR.ts IMAGE.png [MAP_OUT(.png|.f32)]\n";
    return 1;
  }
  const std::string model_path = argv[1], image_path = argv[2], map_path = argc > 3 ? argv[3] : "";
  torch::NoGradGuard no_grad;

  // 1. The exported pipeline.
  torch::jit::script::Module detector;
  try {
    detector = torch::jit::load(model_path, torch::kCPU);
  } catch (const c10::Error& e) {
    std::cerr << model_path << ": not a loadable TorchScript file (" << e.what_without_backtrace() << ")\n";
    return 1;
  }
  detector.eval();

  // 2. The image as uint8 [1, 3, H, W].
  std::vector<uint8_t> pixels;
  int h = 0, w = 0;
  std::string error;
  if (!read_png_rgb(image_path, pixels, h, w, error)) {
    std::cerr << error << "\n";
    return 1;
  }
  torch::Tensor images = torch::from_blob(pixels.data(), {1, h, w, 3}, torch::kUInt8).permute({0, 3, 1, 2}).contiguous();

  // 3. Resize to the traced size S when needed (S: the file's "image_size"; files of earlier versions:
  //    the side of the stitching-weight buffer "count" [1, S, S]).
  int64_t size = -1;
  if (detector.hasattr("image_size")) {
    size = detector.attr("image_size").toInt();
  } else if (detector.hasattr("count")) {
    size = detector.attr("count").toTensor().size(-1);
  }
  if (size > 0 && (h != size || w != size)) {
    torch::Tensor x = at::_upsample_bilinear2d_aa(images.to(torch::kFloat32), {size, size}, /*align_corners=*/false);
    images = x.round().clamp(0, 255).to(torch::kUInt8);
  }

  // 4. Run: (maps [1, S, S], scores [1]).
  torch::Tensor maps, scores;
  try {
    auto out = detector.forward({images}).toTuple();
    maps = out->elements()[0].toTensor().contiguous();
    scores = out->elements()[1].toTensor();
  } catch (const c10::Error& e) {
    std::cerr << model_path << ": failed on " << image_path << " (" << e.what_without_backtrace() << ")\n";
    return 1;
  }
  std::printf("score %.9g\n", scores[0].item<float>());

  // 5. The map.
  if (!map_path.empty()) {
    torch::Tensor m = maps[0].to(torch::kFloat32).contiguous();
    const int64_t mh = m.size(0), mw = m.size(1);
    if (ends_with(map_path, ".png")) {
      const float top = std::max(m.max().item<float>(), 1e-12f);
      torch::Tensor g = (m.clamp_min(0) / top * 255.0f).round().clamp(0, 255).to(torch::kUInt8).contiguous();
      std::vector<uint8_t> grey(g.data_ptr<uint8_t>(), g.data_ptr<uint8_t>() + mh * mw);
      if (!write_png_grey(map_path, grey, static_cast<int>(mh), static_cast<int>(mw))) {
        std::cerr << map_path << ": cannot write PNG\n";
        return 1;
      }
    } else {
      std::ofstream f(map_path, std::ios::binary);
      f.write(reinterpret_cast<const char*>(m.data_ptr<float>()), static_cast<std::streamsize>(mh * mw * sizeof(float)));
      if (!f) {
        std::cerr << map_path << ": cannot write\n";
        return 1;
      }
    }
  }
  return 0;
}
