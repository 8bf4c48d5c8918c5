{
  "targets": [
    {
      "target_name": "qcow2_native",
      "sources": [ "<!@(node -e \"const fs=require('fs');for(const d of ['native','native/qcow2'])for(const f of fs.readdirSync(d).sort())if(f.endsWith('.cc'))console.log(d+'/'+f)\")" ],
      "include_dirs": [ "<!(node -p \"require('node-addon-api').include_dir\")", "native" ],
      "defines": [ "NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64" ],
      "cflags!": [ "-fno-exceptions" ],
      "cflags_cc!": [ "-fno-exceptions", "-std=gnu++17" ],
      "cflags_cc": [ "-std=c++20", "-fexceptions", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers" ],
      "libraries": [ "-ldl", "-lpthread" ]
    }
  ]
}
