// Status: the outcome of native work, carried from a worker thread to the promise it settles.
#pragma once
#include <cerrno>
#include <cstring>
#include <string>

namespace qcow2 {

/// The result of an operation: ok, or an error with a stable `code` and a readable message.
struct Status {
  std::string code;     ///< empty when ok; an errno name ("EIO") or an ERR_QCOW2_* code
  std::string message;  ///< what failed, naming the file and the value that was wrong

  bool ok() const { return code.empty(); }
  explicit operator bool() const { return ok(); }

  static Status Ok() { return {}; }
  static Status Error(std::string code, std::string message) { return {std::move(code), std::move(message)}; }

  /// An error from a failed system call: `code` is the errno name, the message says what was done.
  static Status FromErrno(int err, const std::string& what) {
    const char* name = strerrorname_np(err);
    std::string code = name ? name : "EIO";
    return {code, what + ": " + std::strerror(err)};
  }
};

/// Evaluate an expression yielding Status and return it from the enclosing function if it failed.
#define QCOW2_TRY(expr)                \
  do {                                 \
    ::qcow2::Status _st = (expr);      \
    if (!_st.ok()) return _st;         \
  } while (0)

}  // namespace qcow2
