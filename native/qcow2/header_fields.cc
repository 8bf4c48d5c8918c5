#include "qcow2/header_fields.h"

#include <string>

#include "js.h"
#include "qcow2/layout.h"

namespace qcow2 {

HeaderFields ParseHeaderFields(const Napi::Object& params) {
  Napi::Value value = params.Get("headerFields");
  if (!value.IsObject()) throw Napi::TypeError::New(params.Env(), "option headerFields (the header field offsets of ts/qcow2/header.ts) is required");
  Napi::Object o = value.As<Napi::Object>();
  auto field = [&](const char* key) {
    if (!o.Get(key).IsNumber()) throw Napi::TypeError::New(params.Env(), std::string("option headerFields.") + key + " is required");
    return OptionOffset(o, key, 0);
  };
  HeaderFields f;
  f.size = field("size");
  f.l1Size = field("l1Size");
  f.l1TableOffset = field("l1TableOffset");
  f.refcountTableOffset = field("refcountTableOffset");
  f.refcountTableClusters = field("refcountTableClusters");
  f.incompatibleFeatures = field("incompatibleFeatures");
  return f;
}

Status WriteRefcountTableFields(File& image, const HeaderFields& fields, uint64_t offset, uint64_t clusters) {
  uint8_t bytes[12];
  StoreBE64(bytes, offset);
  StoreBE32(bytes + 8, static_cast<uint32_t>(clusters));
  if (fields.refcountTableClusters == fields.refcountTableOffset + 8) {
    return image.Write(bytes, sizeof bytes, fields.refcountTableOffset);
  }
  QCOW2_TRY(image.Write(bytes, 8, fields.refcountTableOffset));
  return image.Write(bytes + 8, 4, fields.refcountTableClusters);
}

Status WriteIncompatibleFeatures(File& image, const HeaderFields& fields, uint64_t bits) {
  uint8_t bytes[8];
  StoreBE64(bytes, bits);
  return image.Write(bytes, sizeof bytes, fields.incompatibleFeatures);
}

}  // namespace qcow2
