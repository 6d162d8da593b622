// zerofuse::Error: every failure the core reports. The kind tells the Python
// bindings which exception to raise (ValueError / TypeError / RuntimeError).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace zerofuse {

enum class ErrorKind {
  Value,    // an argument has the right type but a wrong value or shape
  Type,     // an argument has the wrong type or dtype
  Runtime,  // something outside the caller's arguments failed (CUDA, not built)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

namespace detail {
template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

template <typename... Parts>
[[noreturn]] void value_error(Parts&&... parts) {
  throw Error(ErrorKind::Value, detail::concat(std::forward<Parts>(parts)...));
}

template <typename... Parts>
[[noreturn]] void type_error(Parts&&... parts) {
  throw Error(ErrorKind::Type, detail::concat(std::forward<Parts>(parts)...));
}

template <typename... Parts>
[[noreturn]] void runtime_error(Parts&&... parts) {
  throw Error(ErrorKind::Runtime, detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace zerofuse
