// defect_fast_run: score one image with an exported defect_fast detector (TorchScript).
//
// Usage: defect_fast_run DETECTOR.ts IMAGE.png [MAP_OUT]
//   DETECTOR.ts  from `defect-fast export RUN --format torchscript --out DETECTOR.ts`; its graph takes
//                images uint8 [B, 3, S, S] (RGB, 0..255) and returns (maps float32 [B, S, S], scores [B]);
//                S, its image_size, from 1 to 32768 (anything else is refused as a damaged file).
//                Its description DETECTOR.ts.json, which export writes beside it, is read when it is
//                there: the file's SHA-256 must be its "file_digest", else the file is refused (a
//                damaged copy; LibTorch's zip reader checks no CRC and scored one with status 0); one
//                of an earlier export, without the digest, is said in a "warning: " line after the score.
//   IMAGE.png    PNG of any bit depth, grey or colour, read to 8-bit RGB as the Python package reads
//                files: 16-bit grey scaled (65535 -> 255), 16-bit colour by its high byte (as PIL),
//                palette expanded, alpha dropped (not blended), gamma chunks ignored; an image that
//                is not S x S is resized to S x S as the package resizes files (PIL's 8-bit BILINEAR,
//                pillow_bilinear below), so the score is the one Detector.predict gives the file.
//                A PNG whose orientation would turn it (EXIF 2..8, in an eXIf chunk, a "Raw profile
//                type exif" text chunk or XMP's tiff:Orientation, where PIL reads it) is refused:
//                Python turns it upright first.
//   MAP_OUT      optional, a new file (an existing one is refused before any work, and never replaced:
//                it is created exclusively at the end, so a failed run leaves none): the anomaly map
//                [S, S]; "*.png" (any case: "*.PNG" too) as 8-bit grey scaled to the map's maximum,
//                anything else as raw little-endian float32, row-major (S*S*4 bytes); "" is refused.
//                Its folder must exist and be writable: checked first, too.
// An image whose width:height lies far outside the training images' (recorded in files exported from
// model files that record them) is scored as any other, and said in one "warning: " line on stderr
// after the score: it is stretched to S x S otherwise than the images the model learnt.
// A blank frame, one colour throughout at S x S (a covered lens, a failed exposure: a camera fault,
// which predict flags defective and watch sets aside, and whose low score would pass), is not scored:
// one line on stderr, exit status 2, nothing on stdout and no map.
// Prints "score <value>" (the image score) on stdout, last (after the map is written); exit status 1
// with a one-line message on any error (an image of more pixels than PIL reads, a model that raises
// or returns anything but maps [1, S, S] and scores [1], or a NaN or infinite map or score, included),
// and nothing on stdout then ("" as DETECTOR or IMAGE is said by name; a closed pipe on stdout
// is such an error, not a death by SIGPIPE). A
// score that cannot be written (stdout closed, a full disk) is an error too, and the map written
// before it is removed: a run that exits 0 printed its score. A PNG
// that ends before its IEND chunk is refused (a file cut off, or still being written), as the
// package's readers refuse it.
#include <caffe2/serialize/inline_container.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <png.h>
#include <sys/stat.h>
#include <torch/script.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <new>
#include <regex>
#include <sstream>
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

int exif_orientation(png_structp png, png_infop info);

// PIL refuses images of more pixels than twice its Image.MAX_IMAGE_PIXELS (a decompression bomb),
// and so does the Python package: a damaged header claiming 1e6 x 1e6 pixels is refused, not
// allocated.
constexpr int64_t kMaxPixels = 2 * int64_t{89478485};

// Reads a PNG as 8-bit RGB, with the conversions the Python package's reader (PIL) makes; returns
// false with a message in `error`. libpng's simplified API is not used: it treats 16-bit samples as
// linear light, applies gAMA chunks and blends alpha onto black, which the Python side does not.
bool read_png_rgb(const std::string& path, std::vector<uint8_t>& pixels, int& height, int& width, std::string& error) {
  // opened without blocking: a FIFO no program writes to made the open wait for ever (one being
  // written, such as /dev/stdin or <(cat photo.png), is read as before: it ends, or reads as cut off)
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK);
  std::FILE* fp = fd < 0 ? nullptr : ::fdopen(fd, "rb");
  if (fp == nullptr) {
    error = path + ": cannot open (" + std::strerror(errno) + ")";
    if (fd >= 0) ::close(fd);
    return false;
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);  // then read as a file is read
  struct stat st {};
  if (::fstat(::fileno(fp), &st) == 0 && (S_ISDIR(st.st_mode) || (S_ISREG(st.st_mode) && st.st_size == 0))) {
    std::fclose(fp);  // said as such, not libpng's "Read Error" or a file cut off
    error = path + (S_ISDIR(st.st_mode) ? ": is a directory, not a PNG file" : ": cannot read PNG (the file is empty)");
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
    // the file ended inside the image or before its IEND chunk (which PIL does not insist on, but a
    // file still being written or cut off in a copy ends so too): said as such, not "Read Error"
    const bool early = std::feof(fp) != 0;
    png_destroy_read_struct(&png, &info, nullptr);
    std::fclose(fp);
    error = path + ": cannot read PNG (" + (early ? std::string("the file ends early: cut off, or still being written")
                                                  : errors.message) + ")";
    return false;
  }
  png_init_io(png, fp);
  // libpng refuses a side over 1,000,000 pixels by default ("Invalid IHDR data"), where PIL reads a
  // strip of any length: any side the PNG format allows, the total bounded by kMaxPixels below
#ifdef PNG_SET_USER_LIMITS_SUPPORTED
  png_set_user_limits(png, PNG_UINT_31_MAX, PNG_UINT_31_MAX);
#endif
  png_read_info(png, info);
  if (static_cast<double>(png_get_image_width(png, info)) * png_get_image_height(png, info) > kMaxPixels) {
    char message[160];  // no std::string here: png_error jumps back past any destructor
    std::snprintf(message, sizeof(message), "implausibly large: %lux%lu pixels, over the %lld the Python package (PIL) "
                  "refuses too", static_cast<unsigned long>(png_get_image_width(png, info)),
                  static_cast<unsigned long>(png_get_image_height(png, info)), static_cast<long long>(kMaxPixels));
    png_error(png, message);
  }
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
  png_read_end(png, info);  // an eXIf chunk may come after the pixels
  const int orientation = exif_orientation(png, info);
  png_destroy_read_struct(&png, &info, nullptr);
  std::fclose(fp);
  if (orientation >= 2 && orientation <= 8) {  // other values are left as stored, by PIL too
    error = path + ": EXIF orientation " + std::to_string(orientation) + " (stored turned or flipped); the Python "
            "package turns such images upright before scoring: save it upright, without the tag";
    return false;
  }
  return true;
}

// PIL's 8-bit BILINEAR resize (libImaging/Resample.c: precompute_coeffs, normalize_coeffs_8bpc and
// the 8bpc passes), which the Python package's reader applies to files of another size: triangle
// weights stretched by the reduction factor (antialiasing), fixed-point taps of 22 bits, each of
// the two passes rounded to 8 bits. Which pass runs first changes the rounding: Pillow 13 runs the
// vertical one first for a square output when h > max(S, 2 w - S) (found by comparing with Pillow
// 13.0 on 600 random sizes; earlier Pillow always ran the horizontal one first). Pillow's notice and
// licence (MIT-CMU): NOTICE-Pillow.txt beside this file.
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Taps {
  int first = 0;                 // first input sample read
  std::vector<int64_t> weights;  // fixed-point weights, one per input sample from `first`
};

std::vector<Taps> bilinear_taps(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;  // BILINEAR's support, stretched when reducing
  const double ss = 1.0 / filterscale;        // (multiplied, not divided: Pillow's rounding)
  std::vector<Taps> taps(out_size);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int count = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    std::vector<double> k(std::max(count, 0));
    double sum = 0.0;
    for (int x = 0; x < count; ++x) {
      const double t = std::fabs((x + xmin - center + 0.5) * ss);
      k[x] = t < 1.0 ? 1.0 - t : 0.0;
      sum += k[x];
    }
    taps[xx].first = xmin;
    for (double v : k) {
      if (sum != 0.0) v /= sum;
      taps[xx].weights.push_back(static_cast<int64_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits)
                                                            : 0.5 + v * (1 << kPrecisionBits)));
    }
  }
  return taps;
}

// One pass along rows (axis 0) or columns (axis 1) of an 8-bit [h, w, 3] image.
std::vector<uint8_t> resample_axis(const std::vector<uint8_t>& in, int h, int w, int out_size, int axis) {
  const int oh = axis == 0 ? out_size : h, ow = axis == 0 ? w : out_size;
  const std::vector<Taps> taps = bilinear_taps(axis == 0 ? h : w, out_size);
  std::vector<uint8_t> out(static_cast<size_t>(oh) * ow * 3);
  for (int y = 0; y < oh; ++y) {
    for (int x = 0; x < ow; ++x) {
      const Taps& t = taps[axis == 0 ? y : x];
      for (int c = 0; c < 3; ++c) {
        int64_t acc = int64_t{1} << (kPrecisionBits - 1);
        for (size_t i = 0; i < t.weights.size(); ++i) {
          const int sy = axis == 0 ? t.first + static_cast<int>(i) : y;
          const int sx = axis == 0 ? x : t.first + static_cast<int>(i);
          acc += in[(static_cast<size_t>(sy) * w + sx) * 3 + c] * t.weights[i];
        }
        out[(static_cast<size_t>(y) * ow + x) * 3 + c] =
            static_cast<uint8_t>(std::clamp<int64_t>(acc >> kPrecisionBits, 0, 255));
      }
    }
  }
  return out;
}

std::vector<uint8_t> pillow_bilinear(const std::vector<uint8_t>& pixels, int h, int w, int size) {
  if (h != size && w != size && h > std::max(size, 2 * w - size)) {  // vertical pass first
    return resample_axis(resample_axis(pixels, h, w, size, 0), size, w, size, 1);
  }
  std::vector<uint8_t> a = w == size ? pixels : resample_axis(pixels, h, w, size, 1);
  return h == size ? a : resample_axis(a, h, size, size, 0);
}

// The orientation tag (0x0112) of an EXIF block (a TIFF header and its first IFD; a leading
// "Exif\0\0", or two, is skipped, as PIL skips them); -1 when the block holds none or cannot be read.
int tiff_orientation(const uint8_t* exif, size_t n) {
  for (int k = 0; k < 2 && n >= 6 && std::memcmp(exif, "Exif\0\0", 6) == 0; ++k) {
    exif += 6;
    n -= 6;
  }
  if (n < 8) return -1;
  // the byte order from the first two bytes; PIL takes the 42 that follows in either order
  // (TiffImagePlugin.PREFIXES: "MM\0*", "II*\0", "MM*\0", "II\0*"); anything else is no TIFF block
  const bool big = std::memcmp(exif, "MM", 2) == 0;
  if (!big && std::memcmp(exif, "II", 2) != 0) return -1;
  if (!((exif[2] == 0 && exif[3] == 42) || (exif[2] == 42 && exif[3] == 0))) return -1;
  auto u16 = [&](size_t at) -> unsigned { return big ? (exif[at] << 8) | exif[at + 1] : exif[at] | (exif[at + 1] << 8); };
  auto u32 = [&](size_t at) -> size_t {
    return big ? (size_t{exif[at]} << 24) | (exif[at + 1] << 16) | (exif[at + 2] << 8) | exif[at + 3]
               : exif[at] | (exif[at + 1] << 8) | (exif[at + 2] << 16) | (size_t{exif[at + 3]} << 24);
  };
  const size_t ifd = u32(4);
  if (ifd + 2 > n) return -1;
  const unsigned entries = u16(ifd);
  for (unsigned i = 0; i < entries && ifd + 2 + 12 * (i + 1) <= n; ++i) {
    const size_t e = ifd + 2 + 12 * i;
    if (u16(e) != 0x0112) continue;
    switch (u16(e + 2)) {  // the value's type: its bytes come first in the value field
      case 3: return static_cast<int>(u16(e + 8));                                 // SHORT (the usual)
      case 4: return static_cast<int>(std::min<size_t>(u32(e + 8), size_t{1} << 16));  // LONG
      case 6: return static_cast<int8_t>(exif[e + 8]);                              // SBYTE
      case 8: return static_cast<int16_t>(u16(e + 8));                              // SSHORT
      case 9: return static_cast<int32_t>(u32(e + 8));                              // SLONG
      default: return -1;  // BYTE (PIL gives bytes), a text, a fraction: no orientation PIL acts on
    }
  }
  return -1;
}

// The orientation PIL's Image.getexif gives a PNG: from its eXIf chunk, else from a "Raw profile
// type exif" text chunk (ImageMagick's: hex after three header lines); when that block has no
// orientation, from XMP's tiff:Orientation. 1 when none says.
int exif_orientation(png_structp png, png_infop info) {
  std::vector<uint8_t> exif;
#ifdef PNG_eXIf_SUPPORTED
  png_uint_32 n = 0;
  png_bytep chunk = nullptr;
  if (png_get_eXIf_1(png, info, &n, &chunk) != 0 && chunk != nullptr) exif.assign(chunk, chunk + n);
#endif
  png_textp text = nullptr;
  int n_text = 0;
  png_get_text(png, info, &text, &n_text);
  std::string xmp;
  for (int i = 0; i < n_text; ++i) {
    const std::string key = text[i].key, value = text[i].text == nullptr ? "" : text[i].text;
    if (key == "XML:com.adobe.xmp") xmp = value;
    if (key != "Raw profile type exif" || !exif.empty()) continue;
    size_t start = 0;  // past the third newline ("\nexif\n   <length>\n<hex>")
    for (int line = 0; line < 3 && start != std::string::npos; ++line) {
      const size_t nl = value.find('\n', start);
      start = nl == std::string::npos ? nl : nl + 1;
    }
    if (start == std::string::npos) continue;
    std::string hex;
    for (char c : value.substr(start)) {
      if (std::isxdigit(static_cast<unsigned char>(c))) hex += c;
    }
    for (size_t k = 0; k + 1 < hex.size(); k += 2) exif.push_back(static_cast<uint8_t>(std::stoi(hex.substr(k, 2), nullptr, 16)));
  }
  const int found = exif.empty() ? -1 : tiff_orientation(exif.data(), exif.size());
  if (found >= 0) return found;
  std::smatch match;
  if (std::regex_search(xmp, match, std::regex("tiff:Orientation(=\"|>)([0-9])"))) return match[2].str()[0] - '0';
  return 1;
}

// What the runner says of a MAP_OUT that exists (the user's file, or the input image).
std::string exists_message(const std::string& path) {
  return path + ": exists; give MAP_OUT a new file name (nothing was replaced)";
}

// A new file to write (C11's exclusive "x" mode: an existing file is refused, never replaced);
// nullptr with a message in `error` otherwise.
std::FILE* open_new(const std::string& path, std::string& error) {
  std::FILE* fp = std::fopen(path.c_str(), "wbx");
  if (fp == nullptr) {
    error = errno == EEXIST ? exists_message(path) : path + ": cannot write (" + std::strerror(errno) + ")";
  }
  return fp;
}

bool write_png_grey(std::FILE* fp, const std::vector<uint8_t>& grey, int height, int width) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = PNG_FORMAT_GRAY;
  return png_image_write_to_stdio(&image, fp, 0, grey.data(), 0, nullptr) != 0;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// The last non-empty line of an exception's text (a TorchScript raise comes with its traceback
// first, the message last): the one line the runner prints.
std::string last_line(const std::string& text) {
  size_t end = text.find_last_not_of("\n ");
  if (end == std::string::npos) return text;
  const size_t start = text.rfind('\n', end);
  return text.substr(start == std::string::npos ? 0 : start + 1, end + 1 - (start == std::string::npos ? 0 : start + 1));
}

// The first line of `text` that is not blank (a TorchScript compile error: its message, then the
// source lines it points at; last_line gave the "<--- HERE" marker).
std::string first_line(const std::string& text) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) return line;
  }
  return text;
}

// What a TorchScript file's forward returned, in a few words: "a tensor of shape [1, 10]",
// "a tuple of 1 element(s)", "a List".
std::string describe(const c10::IValue& v) {
  std::ostringstream text;
  if (v.isTensor()) {
    text << "a tensor of shape " << v.toTensor().sizes();
  } else if (v.isTuple()) {
    text << "a tuple of " << v.toTupleRef().elements().size() << " element(s)";
    if (v.toTupleRef().elements().size() == 2) text << " that are not both tensors";
  } else {
    text << "a " << v.tagKind();
  }
  return text.str();
}

// What DETECTOR.ts must be, in the runner's messages.
constexpr const char* kTorchScriptFile = "a TorchScript file written by `defect-fast export RUN --format torchscript`";

// Why the model file cannot be loaded, before torch tries ("" when it may be): missing, a folder,
// not readable (torch says "open file failed because of errno 2 on fopen").
std::string model_file_problem(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (status.type() == fs::file_type::not_found) return path + ": does not exist";
  if (ec) return path + ": cannot open (" + ec.message() + ")";
  if (status.type() == fs::file_type::directory) return path + ": is a directory, not " + kTorchScriptFile;
  // (a FIFO or a device: its open, or its read, would wait or run for ever)
  if (status.type() != fs::file_type::regular) return path + ": is not a regular file, not " + kTorchScriptFile;
  std::FILE* fp = std::fopen(path.c_str(), "rb");
  if (fp == nullptr) return path + ": cannot open (" + std::strerror(errno) + ")";
  std::fclose(fp);
  return "";
}

// Whether the file begins as every zip archive does ("PK\3\4"): one that does but that torch cannot
// open is cut off, damaged or of a newer torch, which torch's own reason tells apart.
bool begins_as_zip(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "PK\x03\x04", 4) == 0;
}

// The SHA-256 of the file's bytes, in lowercase hex ("" when it cannot be read).
std::string file_sha256(const std::string& path) {
  std::FILE* fp = std::fopen(path.c_str(), "rb");
  if (fp == nullptr) return "";
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  bool ok = ctx != nullptr && EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1;
  std::vector<unsigned char> buf(size_t{1} << 20);
  size_t n = 0;
  while (ok && (n = std::fread(buf.data(), 1, buf.size(), fp)) > 0) ok = EVP_DigestUpdate(ctx, buf.data(), n) == 1;
  ok = ok && std::ferror(fp) == 0;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  ok = ok && EVP_DigestFinal_ex(ctx, md, &len) == 1;
  EVP_MD_CTX_free(ctx);
  std::fclose(fp);
  if (!ok) return "";
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

// The 64 hex digits of `body`'s first "file_digest": "sha256:..." ("" where it is not written so).
// Read by hand: std::regex recursed once a character, and 50 KB of spaces after the key (still
// JSON) overflowed the stack.
std::string digest_in(const std::string& body) {
  const std::string key = "\"file_digest\"", head = "\"sha256:";
  auto skip = [&](size_t j) { while (j < body.size() && std::isspace(static_cast<unsigned char>(body[j]))) ++j; return j; };
  for (size_t at = body.find(key); at != std::string::npos; at = body.find(key, at + 1)) {  // the first written so
    size_t i = skip(at + key.size());
    if (i >= body.size() || body[i] != ':') continue;
    i = skip(i + 1);
    if (body.compare(i, head.size(), head) != 0) continue;
    i += head.size();
    if (i + 65 > body.size() || body[i + 64] != '"') continue;
    const std::string hex = body.substr(i, 64);
    if (hex.find_first_not_of("0123456789abcdef") == std::string::npos) return hex;
  }
  return "";
}

// Why the model file is not the one its description DETECTOR.json (written beside it by export)
// describes ("" when it is, or has no description): its "file_digest" must be the file's SHA-256.
// LibTorch's zip reader checks no CRC, so a damaged copy (a block of zeros, a flipped bit in a
// weight) loaded and scored with exit status 0. A description without a digest (an export of a
// version before it was recorded) checks nothing, as none does: `unchecked` then says so, for a
// warning after the score.
std::string description_problem(const std::string& path, std::string& unchecked) {
  const std::string desc = path + ".json";
  std::error_code ec;
  const auto status = std::filesystem::status(desc, ec);
  // none, or none that can be looked at (a model file's name so long that ".json" makes it too long)
  if (ec || status.type() == std::filesystem::file_type::not_found) return "";
  // export writes a few KB: a FIFO, a device or a file of another size is no description of it
  if (status.type() != std::filesystem::file_type::regular) return desc + ": not a regular file, no description";
  const auto bytes = std::filesystem::file_size(desc, ec);
  if (ec) return desc + ": cannot be read as a description (" + ec.message() + ")";
  if (bytes > (size_t{1} << 20)) {
    return desc + ": over 1 MiB, larger than any description export writes (a damaged or foreign file); copy or "
                  "export the two files again";
  }
  std::ifstream in(desc, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) return desc + ": cannot be read as a description";
  const std::string body = text.str();
  const std::string recorded = digest_in(body);
  if (recorded.empty()) {
    if (body.find("\"file_digest\"") != std::string::npos) {  // there, but not as export writes it: damaged
      return desc + ": its file_digest is not a SHA-256 as export writes it (a damaged description); copy or "
                    "export the two files again";
    }
    unchecked = "warning: " + desc + " records no file_digest (an earlier export), so " +
                std::filesystem::path(path).filename().string() + " was not checked against it; export it again";
    return "";
  }
  const std::string actual = file_sha256(path);
  if (actual.empty()) return path + ": cannot be read to check it against " + desc;
  if (actual != recorded) {
    return path + ": its bytes are not those its description " + desc +
           " records (file_digest): a damaged copy, or one of the two replaced without the other; copy or export "
           "them again";
  }
  return "";
}

// Why torch::jit::load refused a file, in the words of what the file is: another of torch's zip
// archives (a run's model.pt from torch.save, a .pt2 from torch.export) has no constants.pkl, which
// torch reports as a corrupted checkpoint ("failed locating file constants.pkl").
std::string load_failure(const std::string& path, const c10::Error& e) {
  std::string kind;
  try {
    caffe2::serialize::PyTorchStreamReader archive(path);
    if (archive.hasRecord("constants.pkl")) {
      kind = "torchscript";
    } else if (archive.hasRecord("archive_format") || archive.hasRecord("models/model.json")) {
      kind = "a program written by torch.export (a .pt2 file, `defect-fast export --format exported`)";
    } else if (archive.hasRecord("data.pkl")) {
      kind = "a checkpoint written by torch.save (such as a run's model.pt)";
    } else {
      kind = "a zip archive of other files";
    }
  } catch (const c10::Error&) {  // no zip archive, or one torch cannot open: cut off, or of a newer torch
  }
  if (kind.empty() && !begins_as_zip(path)) {
    return std::string("not ") + kTorchScriptFile + " (not a zip archive: another kind of file, or cut off)";
  }
  if (kind.empty()) kind = "torchscript";  // a zip archive torch cannot read: its reason says why
  if (kind != "torchscript") return kind + ", not " + kTorchScriptFile;
  // a TorchScript archive all the same (damaged, or of a newer torch): torch's reason, without its
  // advice on checkpoints
  std::string reason = last_line(e.what_without_backtrace());
  const size_t advice = reason.find(" This is an internal miniz error");
  if (advice != std::string::npos) reason.erase(advice);
  return "not a loadable TorchScript file (" + reason + ")";
}

// The largest side S the runner takes from a file: 2^15. A square of that side is already 6 times the
// pixels PIL reads (kMaxPixels), 3 GiB of RGB input and 4 GiB of float map, far past any size a
// detector is trained at (hundreds of pixels); a larger value is a damaged or foreign file, which
// was narrowed to an int (2^32 + 64 taken as 64) or allocated (2e5: some 120 GB) before.
constexpr int64_t kMaxSide = int64_t{1} << 15;

// The side S the file was traced at: its "image_size" (files of earlier versions: the side of the
// stitching-weight buffer "count" [1, S, S]); -1 when it has neither (the image then goes in as it
// is). An attribute of another kind, or a side outside 1..kMaxSide, is said in `error`, not left to
// throw later with a backtrace or to be allocated.
int64_t traced_size(const torch::jit::script::Module& detector, std::string& error) {
  try {
    int64_t side = -1;
    std::string name;
    if (detector.hasattr("image_size")) {
      const c10::IValue v = detector.attr("image_size");
      if (!v.isInt()) {
        error = std::string("its image_size is a ") + v.tagKind() + ", not an integer";
        return -1;
      }
      side = v.toInt();
      name = "image_size";
    } else if (detector.hasattr("count")) {
      const c10::IValue v = detector.attr("count");
      if (!v.isTensor() || v.toTensor().dim() == 0) {
        error = "its count is " + describe(v) + ", not a tensor [1, S, S]";
        return -1;
      }
      side = v.toTensor().size(-1);
      name = "count's side";
    } else {
      return -1;
    }
    if (side < 1 || side > kMaxSide) {
      error = "its " + name + " " + std::to_string(side) + " is no image side the runner takes (1 to " +
              std::to_string(kMaxSide) + " pixels)";
      return -1;
    }
    return side;
  } catch (const c10::Error& e) {
    error = "its image size cannot be read (" + last_line(e.what_without_backtrace()) + ")";
  }
  return -1;
}

// A width:height ratio as the package writes it: "2.6:1" or "1:2.8" (two digits; whole numbers from 10
// on: "130:1"), as defect_fast.data.io._ratio.
std::string ratio_text(double r) {
  const double big = r >= 1 ? r : 1 / r;
  char text[64];
  std::snprintf(text, sizeof(text), big >= 10 ? "%.0f" : "%.2g", big);
  return r >= 1 ? std::string(text) + ":1" : "1:" + std::string(text);
}

// The warning for an image of width:height far outside the training images' (the file's
// trained_proportions [lowest, highest], outside them by more than its proportions_margin), as the
// package's readers say it: every image is stretched to the model's square input. "" when it lies
// inside, or the file records no proportions (exports of earlier versions, or of a model file without
// them); a record that is not two positive ratios and a margin of at least 1 is said as unreadable,
// naming what is wrong with it.
std::string proportions_warning(const torch::jit::script::Module& detector, const std::string& image, int w, int h) {
  if (!detector.hasattr("trained_proportions")) return "";
  const c10::IValue ratios = detector.attr("trained_proportions");
  if (ratios.isDoubleList() && ratios.toDoubleList().empty()) return "";  // not recorded
  // what keeps the record from being read, named ("" when it can be)
  std::string why;
  double lo = 0, hi = 0, margin = 0;
  if (!ratios.isDoubleList()) {
    why = "its trained_proportions is not a list of floats";
  } else if (ratios.toDoubleList().size() != 2) {
    why = "its trained_proportions holds " + std::to_string(ratios.toDoubleList().size()) + " values, not 2";
  } else {
    lo = ratios.toDoubleList().get(0);
    hi = ratios.toDoubleList().get(1);
    if (!(std::isfinite(lo) && std::isfinite(hi) && lo > 0 && lo <= hi)) {
      why = "its trained_proportions is no [lowest, highest] pair of positive ratios";
    } else if (!detector.hasattr("proportions_margin") || !detector.attr("proportions_margin").isDouble()) {
      why = "it has no proportions_margin of type float";
    } else {
      margin = detector.attr("proportions_margin").toDouble();
      if (!(std::isfinite(margin) && margin >= 1)) why = "its proportions_margin is below 1";
    }
  }
  if (!why.empty()) {
    return "warning: the detector's proportions record cannot be read (" + why +
           "): images of other proportions than the training images are not said";
  }
  const double r = static_cast<double>(w) / h;
  if (lo / margin <= r && r <= hi * margin) return "";
  const std::string span = ratio_text(lo) == ratio_text(hi) ? ratio_text(lo) : ratio_text(lo) + " to " + ratio_text(hi);
  return "warning: " + image + " (" + std::to_string(w) + "x" + std::to_string(h) + ", " + ratio_text(r) +
         ") is of other proportions than the training images (width:height " + span +
         "): it is stretched to the model's square input, so its defects are stretched otherwise than the model "
         "learnt and can pass unseen: inspect pieces of the trained proportions, or train on images of these";
}

// Why MAP_OUT cannot be made, before any work ("" when it can): it exists, or its folder is
// missing or not writable.
std::string map_out_problem(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(fs::symlink_status(path, ec))) return exists_message(path);
  const fs::path parent = fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path();
  if (!fs::is_directory(parent, ec)) {
    // a file where a folder of the path should be (the parent, or one above it) is named as such
    for (fs::path p = parent; !p.empty(); p = p.parent_path()) {
      if (fs::exists(p, ec)) {
        if (!fs::is_directory(p, ec)) return path + ": cannot write (" + p.string() + " is a file, not a folder)";
        break;
      }
      if (p == p.parent_path()) break;
    }
    return path + ": cannot write (its folder " + parent.string() + " does not exist)";
  }
  if (::access(parent.c_str(), W_OK | X_OK) != 0) {
    return path + ": cannot write in its folder " + parent.string() + " (" + std::strerror(errno) + ")";
  }
  return "";
}

// Whether 8-bit RGB pixels (interleaved) are of one colour throughout: every channel constant, the
// package's blank frame (defect_fast.data.io.blank_images).
bool one_colour(const std::vector<uint8_t>& rgb) {
  for (size_t i = 3; i < rgb.size(); ++i) {
    if (rgb[i] != rgb[i % 3]) return false;
  }
  return true;
}

int run(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " DETECTOR.ts IMAGE.png [MAP_OUT(.png|.f32)]\n";
    return 1;
  }
  const std::string model_path = argv[1], image_path = argv[2], map_path = argc > 3 ? argv[3] : "";
  // a reader of stdout that goes away (a supervisor's timeout): the write fails with EPIPE, said and
  // cleaned up below, where the signal ended the process with status 141, no word and the map left
  std::signal(SIGPIPE, SIG_IGN);
  torch::NoGradGuard no_grad;
  for (const auto& [name, value] : {std::pair<const char*, const std::string*>{"DETECTOR", &model_path},
                                    {"IMAGE", &image_path}}) {
    if (value->empty()) {  // a shell variable left unset: said by name (": does not exist" named nothing)
      std::cerr << "defect_fast_run: " << name << " is \"\": give a file name\n";
      return 1;
    }
  }
  if (::fcntl(STDOUT_FILENO, F_GETFD) == -1) {  // closed: the score has nowhere to go (refused before any work)
    std::cerr << "defect_fast_run: cannot print the score (stdout is closed)\n";
    return 1;
  }

  // 0. MAP_OUT must be a new file in a folder the runner can write to: refused now, before any
  //    work (created exclusively at step 5).
  if (argc > 3 && map_path.empty()) {  // a shell variable left unset, not "no map"
    std::cerr << "defect_fast_run: MAP_OUT is \"\": give it a new file name, or leave it out\n";
    return 1;
  }
  if (!map_path.empty()) {
    const std::string problem = map_out_problem(map_path);
    if (!problem.empty()) {
      std::cerr << problem << "\n";
      return 1;
    }
  }

  // 1. The exported pipeline.
  const std::string model_problem = model_file_problem(model_path);
  if (!model_problem.empty()) {
    std::cerr << model_problem << "\n";
    return 1;
  }
  std::string unchecked;  // said after the score, as `stretched`
  const std::string described = description_problem(model_path, unchecked);
  if (!described.empty()) {
    std::cerr << described << "\n";
    return 1;
  }
  torch::jit::script::Module detector;
  try {
    detector = torch::jit::load(model_path, torch::kCPU);
  } catch (const c10::Error& e) {
    std::cerr << model_path << ": " << load_failure(model_path, e) << "\n";
    return 1;
  } catch (const std::exception& e) {  // its code does not compile here (an op of a newer torch, a damaged record)
    std::cerr << model_path << ": not a loadable TorchScript file (" << first_line(e.what()) << ")\n";
    return 1;
  }
  detector.eval();
  std::string error;
  const int64_t size = traced_size(detector, error);  // S: the side the image is resized to
  if (!error.empty()) {
    std::cerr << model_path << ": " << error << ": not an export of a defect_fast detector\n";
    return 1;
  }

  // 2. The image as uint8 [1, 3, H, W].
  std::vector<uint8_t> pixels;
  int h = 0, w = 0;
  if (!read_png_rgb(image_path, pixels, h, w, error)) {
    std::cerr << error << "\n";
    return 1;
  }
  torch::Tensor images = torch::from_blob(pixels.data(), {1, h, w, 3}, torch::kUInt8).permute({0, 3, 1, 2}).contiguous();
  // said after the score (on stderr), so that a run that fails says one line only
  const std::string stretched = proportions_warning(detector, image_path, w, h);

  // 3. Resize to the traced size S when needed (traced_size, read at step 1: 1..kMaxSide, or -1).
  if (size > 0 && (h != size || w != size)) {
    pixels = pillow_bilinear(pixels, h, w, static_cast<int>(size));
    h = w = static_cast<int>(size);
    images = torch::from_blob(pixels.data(), {1, h, w, 3}, torch::kUInt8).permute({0, 3, 1, 2}).contiguous();
  }
  // A frame of one colour throughout at S x S (every channel constant, as the package judges it): a
  // covered lens or a failed exposure, not a part. It is reproduced and scores low, so a caller's
  // `score > threshold` would pass it, where predict flags it defective and watch sets it aside.
  if (one_colour(pixels)) {
    std::cerr << image_path << ": a blank frame, one colour throughout (a covered lens, a failed exposure?): not a "
              << "part, not scored\n";
    return 2;
  }

  // 4. Run: (maps [1, S, S], scores [1]).
  c10::IValue out;
  try {
    out = detector.forward({images});
  } catch (const c10::Error& e) {
    std::cerr << model_path << ": failed on " << image_path << " (" << last_line(e.what_without_backtrace()) << ")\n";
    return 1;
  } catch (const std::exception& e) {  // a raise in the scripted code (torch::jit::JITException)
    std::cerr << model_path << ": failed on " << image_path << " (" << last_line(e.what()) << ")\n";
    return 1;
  }
  // what another TorchScript file returns (one tensor, a tuple of other length) is refused by
  // name, not read past its end or blamed on the image
  const bool pair = out.isTuple() && out.toTupleRef().elements().size() == 2 &&
                    out.toTupleRef().elements()[0].isTensor() && out.toTupleRef().elements()[1].isTensor();
  if (!pair) {
    std::cerr << model_path << ": returned " << describe(out)
              << ", not a pair of tensors (maps, scores): not an export of a defect_fast detector\n";
    return 1;
  }
  torch::Tensor maps = out.toTupleRef().elements()[0].toTensor().contiguous();
  torch::Tensor scores = out.toTupleRef().elements()[1].toTensor();
  if (maps.dim() != 3 || maps.size(0) != 1 || maps.size(1) != h || maps.size(2) != w || scores.dim() != 1 ||
      scores.size(0) != 1) {
    std::cerr << model_path << ": returned maps of shape " << maps.sizes() << " and scores of shape " << scores.sizes()
              << " for an image of " << w << "x" << h << " pixels, not [1, " << h << ", " << w
              << "] and [1]: not an export of a defect_fast detector\n";
    return 1;
  }
  const float score = scores[0].item<float>();
  // a NaN score compares false with any threshold: a caller's `score > threshold` would pass the part
  // (the package's commands refuse such maps and scores too)
  if (!std::isfinite(score) || !torch::isfinite(maps).all().item<bool>()) {
    std::cerr << model_path << ": gives a NaN or infinite " << (std::isfinite(score) ? "map" : "score")
              << " for " << image_path << " (its weights or statistics are not usable)\n";
    return 1;
  }

  // 5. The map, made first, then written into a new file (another process may have made one
  //    since step 0: refused too), so that only the write itself can leave a part of it.
  if (!map_path.empty()) {
    torch::Tensor m = maps[0].to(torch::kFloat32).contiguous();
    const int64_t mh = m.size(0), mw = m.size(1);
    std::string lower = map_path;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    const bool png = ends_with(lower, ".png");  // "map.PNG" too
    std::vector<uint8_t> grey;
    if (png) {
      const float top = std::max(m.max().item<float>(), 1e-12f);
      torch::Tensor g = (m.clamp_min(0) / top * 255.0f).round().clamp(0, 255).to(torch::kUInt8).contiguous();
      grey.assign(g.data_ptr<uint8_t>(), g.data_ptr<uint8_t>() + mh * mw);
    }
    std::string error;
    std::FILE* map_file = open_new(map_path, error);
    if (map_file == nullptr) {
      std::cerr << error << "\n";
      return 1;
    }
    const size_t count = static_cast<size_t>(mh * mw);
    bool written = png ? write_png_grey(map_file, grey, static_cast<int>(mh), static_cast<int>(mw))
                       : std::fwrite(m.data_ptr<float>(), sizeof(float), count, map_file) == count;
    written = std::fclose(map_file) == 0 && written;
    if (!written) {
      std::remove(map_path.c_str());  // the runner's own half-written file
      std::cerr << map_path << ": cannot write\n";
      return 1;
    }
  }
  // the score last: a caller reading stdout gets one only from a run that did all it was asked; a
  // score that is not written (a full disk, /dev/full) fails the run, which then leaves no map
  const bool printed = std::printf("score %.9g\n", score) > 0;
  if (std::fflush(stdout) != 0 || !printed || std::ferror(stdout)) {
    const int err = errno;
    if (!map_path.empty()) std::remove(map_path.c_str());  // the runner's own new file (created exclusively)
    std::cerr << "defect_fast_run: cannot print the score (" << std::strerror(err) << ")\n";
    return 1;
  }
  if (!unchecked.empty()) std::cerr << unchecked << "\n";
  if (!stretched.empty()) std::cerr << stretched << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::bad_alloc&) {
    std::cerr << "defect_fast_run: out of memory\n";
  } catch (const c10::Error& e) {  // its what() ends with a C++ backtrace: the message alone
    std::cerr << "defect_fast_run: " << last_line(e.what_without_backtrace()) << "\n";
  } catch (const std::exception& e) {  // anything else: one line and status 1, never an abort
    std::cerr << "defect_fast_run: " << last_line(e.what()) << "\n";
  }
  return 1;
}
