#include "qcow2/header_fields.h"

#include <string>

#include "js.h"

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

}  // namespace qcow2
