// env_choice.h: the documented debug variables that pick one of a few named behaviours (README, "Debug variables").
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <string>

namespace dmattn {

// The value of environment variable `name`, read now (so a test can switch it per call): one of `choices`, the first
// when the variable is unset or empty. Anything else is a ValueError prefixed with `op` that names the variable and
// its choices ("... must be a, b or c, got 'x'").
inline std::string env_choice(const char* op, const char* name, std::initializer_list<const char*> choices) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return *choices.begin();
  const std::string got(value);
  std::string allowed;
  int i = 0;
  for (const char* choice : choices) {
    if (got == choice) return got;
    allowed += i == 0 ? "" : i + 1 == static_cast<int>(choices.size()) ? " or " : ", ";
    allowed += choice;
    ++i;
  }
  TORCH_CHECK_VALUE(false, op, "the environment variable ", name, " must be ", allowed, ", got '", got, "'");
}

}  // namespace dmattn
