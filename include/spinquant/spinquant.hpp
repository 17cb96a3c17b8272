#pragma once
/// Umbrella header: includes every public header of the library, nothing else.
#include "version.hpp"
#include "config.hpp"
#include "error.hpp"
#include "concepts.hpp"
#include "eigen.hpp"
#include "hadamard.hpp"
#include "quantizer.hpp"
#include "rotation.hpp"
#include "stiefel.hpp"
#include "gptq.hpp"
#include "objective.hpp"
#include "transformer.hpp"
