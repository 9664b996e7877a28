// What every header of the solver core shares: C headers only (no torch, no C++ library), and
// BEMD_HD, which marks a function for both the host and, under nvcc, the device.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define BEMD_HD __host__ __device__
#else
#define BEMD_HD
#endif
