// Placeholder registration for the qcow2 engine; replaced by the engine itself.
#include <napi.h>
namespace qcow2 {
void InitEngine(Napi::Env, Napi::Object) {}
}
