// Input checks shared by the native kernels. The Python wrappers validate user input with
// messages that name the argument; these catch direct torch.ops calls that skip the wrapper.
#pragma once
#include <torch/library.h>

#define DIMASKDINO_CHECK_ARG(cond, name, ...) \
  TORCH_CHECK(cond, "dimaskdino: argument '", name, "': ", __VA_ARGS__)
