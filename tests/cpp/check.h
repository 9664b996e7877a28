// The C++ unit tests' one assertion: CHECK(cond, printf-format, args...) counts the check and, on
// failure, prints the condition and the message and counts the failure; main() reports with
// check_summary() and returns its exit status.
#pragma once

#include <cstdio>

static int g_failures = 0, g_checks = 0;
#define CHECK(cond, ...)                                           \
  do {                                                             \
    ++g_checks;                                                    \
    if (!(cond)) {                                                 \
      ++g_failures;                                                \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                    \
      std::printf("\n");                                           \
    }                                                              \
  } while (0)

static inline int check_summary() {
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
  return g_failures ? 1 : 0;
}
