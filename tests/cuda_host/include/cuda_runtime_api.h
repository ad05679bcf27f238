// The host build finds this instead of the CUDA toolkit's header (tests/cuda_host/README.md).
#pragma once
#include "cuda_host.h"
