// Entropy-coded data check of a baseline (sequential Huffman) JPEG: decodes every Huffman code
// of every block, without dequantization or IDCT, and reports what libjpeg would only warn about
// while still producing an image of garbage pixels: data that ends before the last block
// ("premature end of data segment"), bytes left after it ("extraneous bytes before marker"), a
// code not in the table ("bad Huffman code"), a missing or out-of-order restart marker.
// Progressive and arithmetic-coded files are not checked here (kNotChecked).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "common/check.h"

namespace dimaskdino {
namespace {

enum Result : int64_t {
  kOk = 0,
  kPrematureEnd = 1,
  kExtraneousBytes = 2,
  kBadHuffmanCode = 3,
  kBadRestart = 4,
  kBadStructure = 5,
  kNotChecked = -1,
};

constexpr int kLookupBits = 9;  // codes up to this length decode with one table lookup

struct HuffmanTable {
  bool defined = false;
  std::array<int32_t, 18> maxcode{};  // largest code of each length, -1 when none
  std::array<int32_t, 17> valptr{};   // index into values of the first code of each length
  std::array<int32_t, 17> mincode{};
  std::array<uint16_t, 1 << kLookupBits> lookup{};  // (length << 8 | symbol), 0 = longer code
  std::vector<uint8_t> values;
};

struct Component {
  int id = 0, h = 1, v = 1;
  int dc_table = 0, ac_table = 0;
};

// Bits of the entropy-coded data, MSB first, with 0xFF 0x00 unstuffed. At a marker (or the end
// of the file) the data ends: reading past it fails (libjpeg pads with zeros and warns).
class BitReader {
 public:
  BitReader(const uint8_t* data, size_t size, size_t pos) : data_(data), size_(size), pos_(pos) {}

  // The next n (1..16) bits, zero-padded past the end of the data.
  uint32_t peek(int n) {
    if (count_ < n) refill();
    const uint64_t bits = count_ >= n ? buffer_ >> (count_ - n) : buffer_ << (n - count_);
    return static_cast<uint32_t>(bits) & ((1u << n) - 1);
  }

  // Consumes n bits; false when the data ends before them.
  bool consume(int n) {
    if (count_ < n) refill();
    if (count_ < n) return false;
    count_ -= n;
    return true;
  }

  void align() { count_ -= count_ % 8; }  // the rest of the current byte is padding

  // After align(): the first byte of the data not consumed.
  size_t pos() const {
    const int bytes = count_ / 8;
    const uint32_t mask = bytes >= 32 ? 0xFFFFFFFFu : ((1u << bytes) - 1);
    return pos_ - bytes - __builtin_popcount(stuffed_ & mask);
  }

  void set_pos(size_t pos) {
    pos_ = pos;
    count_ = 0;
    stuffed_ = 0;
    ended_ = false;
  }

 private:
  void refill() {
    while (count_ <= 56 && !ended_) {
      if (pos_ >= size_) {
        ended_ = true;
        break;
      }
      const uint8_t byte = data_[pos_];
      bool stuffed = false;
      if (byte == 0xFF) {
        if (pos_ + 1 >= size_ || data_[pos_ + 1] != 0x00) {
          ended_ = true;  // a marker: the data segment ends here
          break;
        }
        stuffed = true;
      }
      pos_ += stuffed ? 2 : 1;
      stuffed_ = (stuffed_ << 1) | (stuffed ? 1u : 0u);  // one bit per buffered byte, newest lowest
      buffer_ = (buffer_ << 8) | byte;
      count_ += 8;
    }
  }

  const uint8_t* data_;
  size_t size_, pos_;
  uint64_t buffer_ = 0;
  int count_ = 0;
  uint32_t stuffed_ = 0;
  bool ended_ = false;
};

// Decodes one Huffman symbol: >= 0, or -1 past the end, -2 for a code not in the table.
int decode(BitReader& bits, const HuffmanTable& table) {
  uint32_t look = bits.peek(kLookupBits);
  uint16_t entry = table.lookup[look];
  if (entry != 0) return bits.consume(entry >> 8) ? (entry & 0xFF) : -1;
  uint32_t code = bits.peek(16);
  for (int length = kLookupBits + 1; length <= 16; ++length) {
    int32_t c = static_cast<int32_t>(code >> (16 - length));
    if (table.maxcode[length] >= 0 && c <= table.maxcode[length] && c >= table.mincode[length])
      return bits.consume(length) ? table.values[table.valptr[length] + c - table.mincode[length]] : -1;
  }
  // Not a code; past the end, the zero padding may be what made it so.
  return bits.consume(16) ? -2 : -1;
}

int64_t decode_block(BitReader& bits, const HuffmanTable& dc, const HuffmanTable& ac) {
  int s = decode(bits, dc);
  if (s < 0) return s == -1 ? kPrematureEnd : kBadHuffmanCode;
  if (s > 16 || !bits.consume(s)) return s > 16 ? kBadHuffmanCode : kPrematureEnd;
  for (int k = 1; k < 64; ++k) {
    int rs = decode(bits, ac);
    if (rs < 0) return rs == -1 ? kPrematureEnd : kBadHuffmanCode;
    int r = rs >> 4, size = rs & 15;
    if (size) {
      k += r;
      if (!bits.consume(size)) return kPrematureEnd;
    } else {
      if (r != 15) break;  // end of block
      k += 15;
    }
  }
  return kOk;
}

uint16_t be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }

bool parse_dht(const uint8_t* p, size_t length, std::array<HuffmanTable, 8>& tables) {
  size_t i = 0;
  while (i < length) {
    if (i + 17 > length) return false;
    int cls = p[i] >> 4, id = p[i] & 15;
    if (cls > 1 || id > 3) return false;
    HuffmanTable& t = tables[cls * 4 + id];
    int total = 0;
    std::array<int, 17> counts{};
    for (int l = 1; l <= 16; ++l) total += counts[l] = p[i + l];
    if (i + 17 + total > length) return false;
    t.values.assign(p + i + 17, p + i + 17 + total);
    int32_t code = 0, index = 0;
    for (int l = 1; l <= 16; ++l) {
      t.valptr[l] = index;
      t.mincode[l] = code;
      code += counts[l];
      index += counts[l];
      t.maxcode[l] = counts[l] ? code - 1 : -1;
      code <<= 1;
    }
    t.lookup.fill(0);
    for (int l = 1; l <= kLookupBits; ++l) {
      for (int32_t c = t.mincode[l]; c <= t.maxcode[l]; ++c) {
        uint16_t entry = static_cast<uint16_t>(l << 8 | t.values[t.valptr[l] + c - t.mincode[l]]);
        int shift = kLookupBits - l;
        for (int32_t fill = 0; fill < (1 << shift); ++fill) t.lookup[(c << shift) | fill] = entry;
      }
    }
    t.defined = true;
    i += 17 + total;
  }
  return true;
}

// One baseline scan from `start` (the first byte after the SOS header); returns the result and
// leaves `end` at the marker that follows the scan.
int64_t check_scan(const uint8_t* data, size_t size, size_t start, const std::vector<Component*>& scan,
                   int width, int height, int hmax, int vmax, int restart_interval,
                   const std::array<HuffmanTable, 8>& tables, size_t& end) {
  int64_t mcus;
  if (scan.size() == 1) {  // non-interleaved: one block per MCU over the component's own grid
    const Component& c = *scan[0];
    int64_t cw = (static_cast<int64_t>(width) * c.h + hmax - 1) / hmax;
    int64_t ch = (static_cast<int64_t>(height) * c.v + vmax - 1) / vmax;
    mcus = ((cw + 7) / 8) * ((ch + 7) / 8);
  } else {
    mcus = ((width + 8 * hmax - 1) / (8 * hmax)) * static_cast<int64_t>((height + 8 * vmax - 1) / (8 * vmax));
  }
  for (const Component* c : scan)
    if (!tables[c->dc_table].defined || !tables[4 + c->ac_table].defined) return kBadStructure;
  BitReader bits(data, size, start);
  int next_restart = 0;
  for (int64_t m = 0; m < mcus; ++m) {
    if (restart_interval > 0 && m > 0 && m % restart_interval == 0) {
      bits.align();
      size_t p = bits.pos();
      if (p + 1 >= size || data[p] != 0xFF) return kExtraneousBytes;
      while (p + 1 < size && data[p + 1] == 0xFF) ++p;  // fill bytes
      if (p + 1 >= size || data[p + 1] != 0xD0 + next_restart) return kBadRestart;
      next_restart = (next_restart + 1) & 7;
      bits.set_pos(p + 2);
    }
    for (const Component* c : scan) {
      int blocks = scan.size() == 1 ? 1 : c->h * c->v;
      for (int b = 0; b < blocks; ++b) {
        int64_t r = decode_block(bits, tables[c->dc_table], tables[4 + c->ac_table]);
        if (r != kOk) return r;
      }
    }
  }
  bits.align();
  size_t p = bits.pos();
  if (p + 1 >= size || data[p] != 0xFF || data[p + 1] == 0x00) return kExtraneousBytes;
  end = p;
  return kOk;
}

int64_t jpeg_scan_check(const at::Tensor& encoded) {
  DIMASKDINO_CHECK_ARG(encoded.dim() == 1 && encoded.scalar_type() == at::kByte && encoded.is_cpu(),
                       "data", "expected a 1-D uint8 CPU tensor, got ", encoded.scalar_type(), " ",
                       encoded.sizes(), " on ", encoded.device());
  const at::Tensor contiguous = encoded.contiguous();
  const uint8_t* data = contiguous.data_ptr<uint8_t>();
  const size_t size = static_cast<size_t>(contiguous.numel());
  if (size < 4 || data[0] != 0xFF || data[1] != 0xD8) return kBadStructure;
  std::array<HuffmanTable, 8> tables;
  std::vector<Component> components;
  int width = 0, height = 0, hmax = 1, vmax = 1, restart_interval = 0;
  bool frame = false, scanned = false;
  size_t pos = 2;
  while (true) {
    if (pos + 1 >= size) return scanned ? kOk : kBadStructure;  // no EOI: tolerated after a scan
    if (data[pos] != 0xFF) return kBadStructure;
    uint8_t marker = data[pos + 1];
    if (marker == 0xFF) { ++pos; continue; }  // fill byte
    pos += 2;
    if (marker == 0xD9) return scanned ? kOk : kBadStructure;  // EOI
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) return kBadRestart;  // outside a scan
    if (pos + 2 > size) return kBadStructure;
    size_t length = be16(data + pos);
    if (length < 2 || pos + length > size) return kBadStructure;
    const uint8_t* body = data + pos + 2;
    size_t body_length = length - 2;
    if (marker == 0xC0 || marker == 0xC1) {  // baseline / extended sequential, Huffman
      if (body_length < 6) return kBadStructure;
      height = be16(body + 1);
      width = be16(body + 3);
      int n = body[5];
      if (n < 1 || body_length < 6 + 3 * static_cast<size_t>(n) || width == 0 || height == 0) return kBadStructure;
      components.assign(n, Component{});
      for (int i = 0; i < n; ++i) {
        components[i].id = body[6 + 3 * i];
        components[i].h = body[7 + 3 * i] >> 4;
        components[i].v = body[7 + 3 * i] & 15;
        if (components[i].h < 1 || components[i].v < 1) return kBadStructure;
        hmax = std::max(hmax, components[i].h);
        vmax = std::max(vmax, components[i].v);
      }
      frame = true;
    } else if (marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
      return kNotChecked;  // progressive, lossless or arithmetic-coded
    } else if (marker == 0xC4) {
      if (!parse_dht(body, body_length, tables)) return kBadStructure;
    } else if (marker == 0xDD) {
      if (body_length < 2) return kBadStructure;
      restart_interval = be16(body);
    } else if (marker == 0xDA) {
      if (!frame || body_length < 1) return kBadStructure;
      size_t n = body[0];
      if (n < 1 || body_length < 1 + 2 * n + 3) return kBadStructure;
      std::vector<Component*> scan;
      for (size_t i = 0; i < n; ++i) {
        Component* found = nullptr;
        for (Component& c : components)
          if (c.id == body[1 + 2 * i]) found = &c;
        if (found == nullptr) return kBadStructure;
        found->dc_table = body[2 + 2 * i] >> 4;
        found->ac_table = body[2 + 2 * i] & 15;
        if (found->dc_table > 3 || found->ac_table > 3) return kBadStructure;
        scan.push_back(found);
      }
      size_t end = 0;
      int64_t r = check_scan(data, size, pos + length, scan, width, height, hmax, vmax, restart_interval,
                             tables, end);
      if (r != kOk) return r;
      scanned = true;
      pos = end;
      continue;
    }
    pos += length;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dimaskdino, CPU, m) { m.impl("jpeg_scan_check", &jpeg_scan_check); }

}  // namespace dimaskdino
